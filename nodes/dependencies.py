"""Cheap checks (no imports) that the packages the core needs are installed."""

from __future__ import annotations

import importlib.util
import sys

#: import name -> pip requirement, for what ``internvl_u_core`` imports.
REQUIRED = {
    "torch": "torch",
    "numpy": "numpy",
    "PIL": "Pillow",
    "safetensors": "safetensors",
    "transformers": "transformers",
    "diffusers": "diffusers",
    "accelerate": "accelerate",
    "huggingface_hub": "huggingface_hub",
}
#: import name -> pip requirement, for what ``internvl_u_core`` imports only for an optional feature
#: (it names the package itself when the feature is asked for without it).
OPTIONAL = {
    "torchao": "torchao",  # quantization int8/fp8 on CUDA
    "peft": "peft",  # LoRA adapters: the InternVL-U LoRA node, pipe.load_lora, train-lora
    "tqdm": "tqdm",  # train-lora's progress bar (installed with diffusers and transformers)
    "httpx": "httpx",  # RemoteInternVLU (the [remote] extra): the InternVL-U Remote Loader node
}


def missing_dependencies() -> list[str]:
    """pip names of required packages that cannot be found, without importing any of them."""
    return [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]


def install_hint(missing: list[str]) -> str:
    """The command that installs ``missing`` into the Python running ComfyUI."""
    return f"Install with: {sys.executable} -m pip install {' '.join(missing)}"
