#!/bin/sh
# Install this package into the active Python with the torch build this machine can use:
#   sh install.sh               the core and the `internvl-u` command
#   sh install.sh ".[agents]"   with extras (any pip requirement naming this folder)
# Without an NVIDIA GPU (no `nvidia-smi`), torch comes from PyTorch's CPU index (about 1.4 GB of
# virtual environment instead of 6 GB with the CUDA libraries); with one, from PyPI, whose Linux
# wheels are CUDA builds. TORCH_INDEX_URL chooses another build, e.g.
# https://download.pytorch.org/whl/cu128 or https://download.pytorch.org/whl/rocm6.4.
# A torch that is already installed is kept.
set -eu
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
if ! "$python" -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$python" -m pip install torch --index-url "$TORCH_INDEX_URL"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        "$python" -m pip install torch
    else
        echo "install.sh: no nvidia-smi here: installing the CPU build of torch" >&2
        "$python" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"$python" -m pip install -e "${1:-.}"
