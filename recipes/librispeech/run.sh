#!/usr/bin/env bash
# Hinton, Vinyals & Dean (2015, section 4) on LibriSpeech: N frame-classifier members over the
# pdfs of a flat-start monophone HMM, their ensemble, and distilled students, decoded with the
# official 3-gram LM (tgsmall by default).
#
#   # with a local copy of LibriSpeech (and resource-11 files in $corpus_dir or --lm-dir):
#   recipes/librispeech/run.sh --corpus-dir /data/LibriSpeech --device cuda
#   # download first (internet needed; resumable, md5-checked):
#   recipes/librispeech/run.sh --download-dir /data --device cuda
#   # a copy without dev-other/test-other (any subsets; acwt and T are tuned on the first dev set):
#   recipes/librispeech/run.sh --corpus-dir /data/LibriSpeech --dev-sets dev-clean --test-sets test-clean
#   # several GPUs (torchrun, DDP); 460 h of training data:
#   recipes/librispeech/run.sh --corpus-dir /data/LibriSpeech --device cuda --ngpu 4 \
#       --train-subsets train-clean-100,train-clean-360
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=0
stop_stage=9
nj=16
exp=exp/librispeech
conf=recipes/librispeech/conf
corpus_dir=""                       # an existing LibriSpeech folder (holding dev-clean/, ...)
download_dir=""                     # or: download the subsets here first
lm_dir=""                           # resource-11 files (3-gram.pruned.3e-7.arpa.gz, librispeech-lexicon.txt,
                                    # librispeech-vocab.txt); default: $download_dir or $corpus_dir
lm=tgsmall                          # tgsmall (3-gram.pruned.3e-7) | tgmed (3-gram.pruned.1e-7)
train_subsets=train-clean-100       # comma-separated; train-clean-100,train-clean-360(,train-other-500)
dev_sets=dev-clean,dev-other        # comma-separated; acwt and T are tuned on the first
test_sets=test-clean,test-other     # comma-separated; any subsets the copy holds
train_config=hinton2015             # conf/<name>.yaml: hinton2015 (the paper's 8 x 2560) | small
members=10
ensemble_sizes=1,2,3,4,5,6,7,8,9,10
students="distill_paper distill"    # student variants: conf/<name>.yaml each, trained into $exp/<name>
transfer_subsets=""                 # unlabelled transfer sets for distillation, e.g. train-clean-360,train-other-500
decode_ensemble_sizes=2,5
device=cuda
ngpu=1
train_overrides=""
gmm_acwt_grid=0.05,0.08,0.1,0.12
nn_acwt_grid=0.1,0.15,0.2,0.3
labels=tri                           # frame labels: tri (tied triphone states, stage 4) | mono (monophone pdfs)
help_message="Usage: $0 (--corpus-dir DIR | --download-dir DIR) [--stage N] [--stop-stage N] [--device cuda] [--ngpu N] ..."

. recipes/common/parse_options.sh
. recipes/common/path.sh
. recipes/common/stage.sh
check_pipeline_options 9          # before any step: a rejected option leaves every output as it is

if [ -z "$corpus_dir" ]; then
  [ -n "$download_dir" ] || { echo "$0: give --corpus-dir or --download-dir" >&2; exit 1; }
  corpus_dir=$download_dir/LibriSpeech
fi
[ -n "$lm_dir" ] || lm_dir=${download_dir:+$download_dir/lm}   # download-librispeech puts them in lm/
[ -n "$lm_dir" ] || lm_dir=$corpus_dir
dev_sets=$(echo "$dev_sets" | tr , ' '); test_sets=$(echo "$test_sets" | tr , ' ')
[ -n "$dev_sets" ] && [ -n "$test_sets" ] || { echo "$0: give at least one --dev-sets and one --test-sets" >&2; exit 1; }
train_set=$(echo "$train_subsets" | tr , +)     # one training set; several subsets are merged
transfer_sets=$(echo "$transfer_subsets" | tr , ' ')
case $lm in
  tgsmall) arpa=$lm_dir/3-gram.pruned.3e-7.arpa.gz ;;
  tgmed) arpa=$lm_dir/3-gram.pruned.1e-7.arpa.gz ;;
  *) echo "$0: --lm must be tgsmall or tgmed" >&2; exit 1 ;;
esac
lexicon_extra=$lm_dir/librispeech-lexicon.txt
vocab_file=$lm_dir/librispeech-vocab.txt
lm_text=""
train_conf=$conf/$train_config.yaml
[ -f "$train_conf" ] || { echo "$0: no $train_conf" >&2; exit 1; }
t0=$SECONDS

# ---- stage 0: download (resumable, md5-checked) or use an existing copy
if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  if [ -n "$download_dir" ]; then
    log "stage 0: download LibriSpeech to $download_dir"
    asr download-librispeech --target-dir "$download_dir" \
      --subsets "$(echo "$dev_sets $test_sets $transfer_sets" | tr ' ' ,),$train_subsets"
  fi
  [ -d "$corpus_dir" ] || { echo "$0: $corpus_dir does not exist" >&2; exit 1; }
  log "stage 0: using LibriSpeech at $corpus_dir"
fi

. recipes/common/pipeline.sh

log "done in $((SECONDS - t0)) s"
