#!/usr/bin/env bash
# One row of README's "Distillation ablation": a student variant trained on the members of an
# existing mini run, with conf/distill.yaml plus KEY=VALUE overrides of asr.distill.DistillConfig.
# It writes only $exp/<name>/ (a new folder per variant); the members, features and alignments are
# read, never rebuilt. Prints the chosen student's dev-clean and test-clean frame accuracy (dev is
# what chooses; test is only reported).
#
#   # a larger transfer set first, if the variant needs one (the other subsets stay byte-identical):
#   asr build-mini-corpus --out-dir exp/t96/corpus --seed 1 --num-utts 1600 --transfer-utts 9600 transfer_speakers=240
#   asr prepare-librispeech --corpus-dir exp/t96/corpus --subsets train-unlabeled --out-dir exp/t96/data
#   asr make-feats --manifest exp/t96/data/train-unlabeled/manifest.jsonl --out-dir exp/t96/feats
#   # then, e.g., the student at Adam lr 5e-4 on it:
#   recipes/mini/local/distill_variant.sh --transfer-feats exp/t96/feats lr05 lr=0.0005
set -euo pipefail
cd "$(dirname "$0")/../../.."

exp=exp/mini
conf=recipes/mini/conf
members=""                                  # teachers: seeds 1..N (default: every $exp/members/seed*)
transfer_feats=""                           # unlabelled frames for the soft loss (default: $exp/feats/train-unlabeled)
cache_dir=""                                # default: $exp/<name>/soft_targets (reuse one across variants)
help_message="Usage: $0 [--exp DIR] [--transfer-feats DIR] [--cache-dir DIR] NAME [KEY=VALUE ...]"

. recipes/common/parse_options.sh
. recipes/common/path.sh
[ $# -ge 1 ] || { echo "$help_message" >&2; exit 1; }
name=$1; shift
[ -d "$exp/members/seed1" ] || { echo "$0: $exp/members/seed1 not found: run recipes/mini/run.sh --stop-stage 6 first" >&2; exit 1; }

[ -n "$transfer_feats" ] || transfer_feats=$exp/feats/train-unlabeled
[ -n "$members" ] || members=$(ls -d "$exp"/members/seed*/ | wc -l)
teachers=(); for i in $(seq 1 "$members"); do teachers+=("$exp/members/seed$i/model.pt"); done
opts=(--config "$conf/distill.yaml" --transfer-feats "$transfer_feats")
[ -n "$cache_dir" ] && opts+=(--cache-dir "$cache_dir")
[ $# -gt 0 ] && opts+=(--set "$@")
asr distill --teachers "${teachers[@]}" --train-feats "$exp/feats/train-clean" --train-ali "$exp/ali/train-clean" \
  --dev-feats "$exp/feats/dev-clean" --dev-ali "$exp/ali/dev-clean" --out-dir "$exp/$name" \
  --post test-clean="$exp/feats/test-clean" "${opts[@]}"

python - "$exp" "$name" <<'PY'
import sys
from pathlib import Path

import numpy as np

from asr.io import read_json
from asr.labels import LabelStore
from asr.scoring import frame_accuracy

exp, name = Path(sys.argv[1]), sys.argv[2]
choice = read_json(exp / name / "choice.json")
post = np.load(exp / name / choice["best_dir"] / "post" / "test-clean.npy", mmap_mode="r")
test, _ = frame_accuracy(post, LabelStore(exp / "ali" / "test-clean").labels)
dev = max(choice["per_temperature"].values())  # the chosen student is the best on dev
print(f"{name} ({choice['best_dir']}): frame accuracy dev-clean {dev:.2f} %, test-clean {test:.2f} %")
PY
