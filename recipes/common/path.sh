#!/usr/bin/env bash
# Puts the repository's virtual environment first on PATH (made by scripts/setup.sh), so recipes
# call the `asr` of this checkout.
__root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -x "$__root/.venv/bin/asr" ]; then
  export PATH="$__root/.venv/bin:$PATH"
fi
command -v asr >/dev/null || { echo "asr not found: run 'bash scripts/setup.sh' first" >&2; exit 1; }
# Two processes per core make everything slower (docs/DESIGN.md section 8): one torch thread per job.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}   # progress bars in logs: one line every 10 s
unset __root
