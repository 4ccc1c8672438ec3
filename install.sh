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
        cpu_index=https://download.pytorch.org/whl/cpu
        # Name the newest "+cpu" release outright: pip's own configuration may add indexes or folders
        # that hold CUDA builds of newer releases, which a bare `torch` would prefer.
        cpu_release=$("$python" -m pip index versions torch --index-url "$cpu_index" 2>/dev/null \
            | sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' | grep '+cpu$' | head -n 1 || true)
        "$python" -m pip install "torch${cpu_release:+==$cpu_release}" --index-url "$cpu_index"
    fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1 \
    && "$python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "install.sh: note: this torch is a CUDA build (several GB) on a machine without nvidia-smi;" \
        "'pip uninstall torch' and run install.sh again for the CPU build" >&2
fi
"$python" -m pip install -e "${1:-.}"
