#!/usr/bin/env bash
# The whole experiment of Hinton, Vinyals & Dean (2015, section 4) on the synthetic mini corpus:
# ten members on tied triphone states, their ensemble, distilled students, decoded with a
# context-dependent HMM back end, on 2 CPU cores. Ends by printing the results table.
#
#   recipes/mini/run.sh                         # everything
#   recipes/mini/run.sh --stage 5 --stop-stage 7
#   recipes/mini/run.sh --exp exp/smoke --num-utts 80 --members 2 --ensemble-sizes 1,2 \
#       --transfer-utts 40 --train-overrides "epochs=1"        # a quick smoke run
set -euo pipefail
cd "$(dirname "$0")/../.."          # paths below are relative to the repository root

# ---- options (each one can be given as --name value; an option exists only if it has a default)
stage=0
stop_stage=9
nj=2                                 # parallel jobs (feature extraction, alignment, decoding)
exp=exp/mini                         # every output goes under this folder
conf=recipes/mini/conf
seed=1                               # corpus seed
num_utts=1600                        # corpus size (utterances over all subsets)
transfer_utts=9600                   # unlabelled transfer subset for distillation (0: none; voices: conf/corpus.yaml)
members=10                           # ensemble members (seeds 1..N)
ensemble_sizes=1,2,3,4,5,6,7,8,9,10  # ensemble-size curve (first k members)
students="distill_paper distill"     # student variants: conf/<name>.yaml each, trained into $exp/<name>
device=cpu
ngpu=1
train_overrides=""                   # extra TrainConfig key=value pairs, e.g. "epochs=1" (smoke runs)
gmm_acwt_grid=0.06,0.08,0.1         # acwt grids tried on dev; they widen by themselves at an edge
nn_acwt_grid=0.12,0.16,0.2
decode_ensemble_sizes=2,5            # ensembles decoded for WER besides the largest (all get frame accuracy)
labels=tri                           # frame labels: tri (tied triphone states, stage 4) | mono (monophone pdfs)
help_message="Usage: $0 [--stage N] [--stop-stage N] [--nj N] [--exp DIR] [--num-utts N] [--members N] ..."

. recipes/common/parse_options.sh
. recipes/common/path.sh
. recipes/common/stage.sh
check_pipeline_options 9          # before any step: a rejected option leaves every output as it is
check_int num_utts 1; check_int seed 0

corpus_dir=$exp/corpus
train_set=train-clean
dev_sets="dev-clean"
test_sets="test-clean test-other"
transfer_sets=""; [ "$transfer_utts" -gt 0 ] && transfer_sets=train-unlabeled
lexicon_extra=""                     # no librispeech-lexicon.txt for the mini corpus: CMUdict only
lm_text=$corpus_dir/lm_text.txt
vocab_file=$lm_text                  # lexicon and LM cover the words of the LM text ...
arpa=""                              # ... and the LM is trained on it (stage 3)
train_conf=$conf/train.yaml
t0=$SECONDS

# ---- stage 0: build the synthetic corpus (LibriSpeech layout, Debian TTS voices, KJV text)
if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  log "stage 0: synthetic corpus ($num_utts utterances, seed $seed)"
  corpus_conf=(); corpus_input=""       # no conf/corpus.yaml: the builder's defaults
  if [ -f "$conf/corpus.yaml" ]; then corpus_conf=(--config "$conf/corpus.yaml"); corpus_input=$conf/corpus.yaml; fi
  run_step "$corpus_dir" "$corpus_input" -- \
    asr build-mini-corpus --out-dir "$corpus_dir" --seed "$seed" --num-utts "$num_utts" \
      --transfer-utts "$transfer_utts" --nj "$nj" "${corpus_conf[@]}"
fi

. recipes/common/pipeline.sh

log "done in $((SECONDS - t0)) s"
