#!/usr/bin/env bash
# Create .venv and install rocmforge into it (editable), with the extras named in $1
# (e.g. "test"). On a machine without a GPU, PyTorch's CPU build is installed first so
# that pip never pulls a multi-GB CUDA build; GPU machines keep (or get) their own build.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3}"
torch_spec="${ROCMFORGE_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 || [ -e /dev/kfd ]; then
    echo "bootstrap: GPU detected; installing the default torch build for it" >&2
    python -m pip install -q torch
  else
    echo "bootstrap: no GPU; installing the CPU build ($torch_spec)" >&2
    python -m pip install -q "$torch_spec"
  fi
fi

target="."
[ -n "$extras" ] && target=".[$extras]"
python -m pip install -q -e "$target"
# The native CPU kernels (a C++ extension, cached under ~/.cache/rocmforge/native): built now
# rather than at the first model load. Without a compiler rocmforge still runs (torch's kernels).
python -m rocmforge.native || echo "bootstrap: native CPU kernels not built; the CPU will use torch's kernels" >&2
