#!/usr/bin/env bash
# One-shot set-up on a fresh Debian machine: system packages, then a virtual environment at .venv/
# with the package installed in editable mode (plus test extras).
# Usage: bash scripts/setup.sh            (run from anywhere; needs root or sudo for apt-get)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

apt_pkgs=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
          sox libsox-fmt-all flac bible-kjv fortunes pocketsphinx-testdata)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip_install() {  # quiet, minus the notes pip prints about unreachable extra index folders
  .venv/bin/pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
# torch 2.14.1 + torchaudio 2.11.0 is the pair known to import together (docs/DESIGN.md section 4).
pip_install "torch==2.14.1" "torchaudio==2.11.0"
pip_install -e ".[test]"
echo "set-up done: $(.venv/bin/python -c 'import torch, torchaudio; print("torch", torch.__version__, "torchaudio", torchaudio.__version__)')"
