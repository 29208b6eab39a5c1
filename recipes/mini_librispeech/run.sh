#!/usr/bin/env bash
# Hinton, Vinyals & Dean (2015, section 4) on real speech that fits a CPU: mini-LibriSpeech
# (OpenSLR resource 31: train-clean-5, 5 h, 28 readers; dev-clean-2, 2 h, 40 readers), as Kaldi's
# egs/mini_librispeech/s5. Ten `small` members on tied triphone states, their ensemble, distilled
# students, a context-dependent HMM back end; 2-16 cores, no GPU. Ends by printing the results table.
#
#   # download train-clean-5, dev-clean-2 and the resource-11 LM files (internet; resumable, md5-checked):
#   recipes/mini_librispeech/run.sh
#   # a local copy (LibriSpeech/ holding train-clean-5/ and SPEAKERS.TXT; dev-clean-2/ if you have it):
#   recipes/mini_librispeech/run.sh --corpus-dir /data/LibriSpeech [--lm-dir /data/lm] [--nj 8]
#
# Sets: with dev-clean-2, train = train-clean-5 and dev-clean-2 is split by speaker into dev and
# test (half each, so acwt and T are never tuned on test readers); without it, train-clean-5 is
# split by speaker into train / dev / test (20 / 4 / 4 readers, balanced by sex). --split SPEC
# (prepare-librispeech --split syntax) or --split none with --train-set/--dev-sets/--test-sets
# choose otherwise. LM: tgsmall when $lm_dir has it, else a 3-gram on the training transcripts
# plus --lm-text (never on dev/test sentences: asr train-lm refuses them).
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=0
stop_stage=9
nj=2                                 # parallel jobs (audio check, features, alignment, decoding)
exp=exp/mini_librispeech
conf=recipes/mini_librispeech/conf
corpus_dir=""                        # a local LibriSpeech folder; empty: download to $download_dir
download_dir=downloads               # archives and the unpacked corpus (stage 0 without --corpus-dir)
lm_dir=""                            # resource-11 files (3-gram.pruned.3e-7.arpa.gz, librispeech-lexicon.txt,
                                     # librispeech-vocab.txt); default: $download_dir/lm or $corpus_dir
lm_text=""                           # without tgsmall: extra LM text (one sentence a line) besides the transcripts
split=auto                           # auto | none | SUBSET:NAME=N,... (speaker split, see above)
split_seed=0
train_set=""                         # default: from the split (train / train-clean-5)
dev_sets=""                          # comma-separated; default: dev (from the split)
test_sets=""                         # comma-separated; default: test (from the split)
members=10
ensemble_sizes=2,5,10                # fewer than recipes/mini: every system is decoded on 2 h of real audio
decode_ensemble_sizes=2,5
students="distill_paper distill"     # student variants: conf/<name>.yaml each, trained into $exp/<name>
transfer_sets=""                     # unlabelled sets for distillation, e.g. a split's "transfer" part
labels=tri                           # tri (tied triphone states, stage 4) | mono
device=cpu
ngpu=1
train_overrides=""
gmm_acwt_grid=0.06,0.08,0.1
nn_acwt_grid=0.12,0.16,0.2
help_message="Usage: $0 [--corpus-dir DIR [--lm-dir DIR] | --download-dir DIR] [--split auto|none|SPEC] [--stage N] [--nj N] ..."

. recipes/common/parse_options.sh
. recipes/common/path.sh
. recipes/common/stage.sh
check_pipeline_options 9          # before any step: a rejected option leaves every output as it is
transfer_sets=$(echo "$transfer_sets" | tr , ' ')

t0=$SECONDS
# ---- stage 0: download (resumable, md5-checked) or use an existing copy
if [ -z "$corpus_dir" ]; then
  corpus_dir=$download_dir/LibriSpeech
  [ -n "$lm_dir" ] || lm_dir=$download_dir/lm
  if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
    log "stage 0: download train-clean-5, dev-clean-2 (OpenSLR 31) to $download_dir"
    asr download-librispeech --target-dir "$download_dir" --subsets train-clean-5,dev-clean-2 --no-lm
    asr download-librispeech --target-dir "$download_dir" --subsets "" \
        --lm-files 3-gram.pruned.3e-7.arpa.gz,librispeech-lexicon.txt,librispeech-vocab.txt ||
      log "stage 0: no resource-11 LM files (offline?); a 3-gram is trained on the transcripts instead"
  fi
fi
[ -n "$lm_dir" ] || lm_dir=$corpus_dir
[ -d "$corpus_dir/train-clean-5" ] || [ "$split" != auto ] ||
  { echo "$0: $corpus_dir/train-clean-5 does not exist (give --corpus-dir DIR holding it)" >&2; exit 1; }

# ---- which sets: split by speaker where the copy lacks a dev/test set of its own
prep_subsets=""; split_spec=""
case $split in
  auto)
    if [ -d "$corpus_dir/dev-clean-2" ]; then
      split_spec="dev-clean-2:dev=0.5,test=0.5"; prep_subsets=train-clean-5
      : "${train_set:=train-clean-5}"
    else
      split_spec="train-clean-5:train=20,dev=4,test=4"; prep_subsets=""
      : "${train_set:=train}"
    fi ;;
  none) : "${train_set:=train-clean-5}" "${dev_sets:=dev-clean-2}" ;;
  *) split_spec=$split; : "${train_set:=train}" ;;
esac
: "${dev_sets:=dev}" "${test_sets:=test}"
dev_sets=$(echo "$dev_sets" | tr , ' '); test_sets=$(echo "$test_sets" | tr , ' ')
[ -n "$test_sets" ] || { echo "$0: give --test-sets" >&2; exit 1; }
if [ -n "$split_spec" ]; then
  # read from the corpus: the split's subset and every set the split does not make
  made=" $(echo "${split_spec#*:}" | tr , '\n' | cut -d= -f1 | tr '\n' ' ') "
  prep_subsets=${split_spec%%:*}
  for s in $train_set $dev_sets $test_sets; do
    case $made in *" $s "*) ;; *) prep_subsets+=",$s" ;; esac
  done
fi

# ---- LM: tgsmall when present, else a 3-gram on the training transcripts (+ --lm-text)
lexicon_extra=$lm_dir/librispeech-lexicon.txt   # used when present (CMUdict otherwise)
if [ -f "$lm_dir/3-gram.pruned.3e-7.arpa.gz" ]; then
  arpa=$lm_dir/3-gram.pruned.3e-7.arpa.gz
  vocab_file=$lm_dir/librispeech-vocab.txt
  [ -f "$vocab_file" ] || { echo "$0: $vocab_file is missing (it comes with tgsmall)" >&2; exit 1; }
  lm_transcripts=no
else
  arpa=""
  # lang keeps the whole lexicon (CMUdict + librispeech-lexicon.txt), as Kaldi's mini_librispeech
  # lang does: dev/test words get real phones in their alignments (not <UNK>/SPN), while G, and
  # so the decoder, only knows the words of the LM's training text.
  vocab_file=""
  lm_transcripts=yes
fi
train_conf=$conf/train.yaml

. recipes/common/pipeline.sh

log "done in $((SECONDS - t0)) s"
