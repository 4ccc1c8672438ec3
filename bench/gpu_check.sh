#!/usr/bin/env bash
# The prepared GPU check (bench/README.md, "GPU check"). Two steps:
#
#   bench/gpu_check.sh prepare REFERENCE_DIR   # here, with network: wheels into .whl/, the official code into .ref/
#   bench/gpu_check.sh [ARGS...]               # on the GPU machine (or anywhere: CPU fallback without CUDA)
#
# .whl/ and .ref/ are never committed (.git/info/exclude); the device tool carries them.
# The run installs the carried wheels into /tmp (ours and the reference's pins apart), then runs
# bench/gpu_check.py; its JSON and images go to $OUT when that is set, else to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

OURS_WHEELS=("diffusers==0.42.1" "peft==0.21.2")  # peft: the LoRA training step (bench/lora.py)
# The quantisation ladder's libraries (int8/fp8 through torchao, nf4 through bitsandbytes), kept apart:
# with them the carried folders pass the device tool's 64 MiB, so the ladder runs as its own command.
QUANT_WHEELS=("torchao==0.18.0" "bitsandbytes==0.50.2")
REFERENCE_WHEELS=("transformers==4.52.3" "diffusers==0.35.1" "tokenizers==0.21.4" "huggingface_hub==0.36.2")

if [[ "${1:-}" == "prepare" ]]; then
    reference="${2:?usage: bench/gpu_check.sh prepare REFERENCE_DIR (a copy of the official InternVL-U code)}"
    [[ -d "$reference/internvlu" ]] || { echo "$reference has no internvlu/ package" >&2; exit 2; }
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    for path in /.whl/ /.ref/; do
        grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"
    done
    rm -rf .whl .ref && mkdir -p .whl/ours .whl/reference .whl/quant .ref
    download=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64)
    "${download[@]}" -d .whl/ours "${OURS_WHEELS[@]}"
    "${download[@]}" -d .whl/reference "${REFERENCE_WHEELS[@]}"
    "${download[@]}" -d .whl/quant "${QUANT_WHEELS[@]}"
    cp -r "$reference/internvlu" .ref/internvlu
    du -sh .whl .ref
    echo 'ready: run with the device tool, carry [".whl/ours", ".whl/reference", ".ref"], command'
    echo '"bash bench/gpu_check.sh --ladder off"; then carry [".whl/ours", ".whl/quant"], command'
    echo '"bash bench/gpu_check.sh --ladder only" (the quantisation and offload ladder)'
    exit 0
fi

args=("$@")
install() {  # install the wheels of the folders given into site $1
    local site="$1" && shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@"
}
if [[ -d .whl/ours ]]; then
    wheels=(.whl/ours/*.whl)
    [[ -d .whl/quant ]] && wheels+=(.whl/quant/*.whl)
    install /tmp/internvlu-site-ours "${wheels[@]}"
    args+=(--ours-site /tmp/internvlu-site-ours)
fi
if [[ -d .whl/reference ]]; then
    install /tmp/internvlu-site-reference .whl/reference/*.whl
    args+=(--reference-site /tmp/internvlu-site-reference)
fi
if [[ -d .ref/internvlu ]]; then
    args+=(--reference .ref)
fi
if [[ -n "${OUT:-}" ]]; then
    args+=(--out "$OUT")
fi
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py "${args[@]}"
