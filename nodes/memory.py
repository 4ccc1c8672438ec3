"""Registering the pipeline with ComfyUI's model management.

The pipeline's modules are wrapped in a ``comfy.model_patcher.ModelPatcher`` so that ComfyUI moves
them between its load and offload devices, unloads them for other models, for "Unload models",
``POST /free`` and after an out-of-memory error. Outside ComfyUI the modules are moved directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .comfy_runtime import comfy_module


class PipelineModules(nn.ModuleDict):
    """The pipeline's components as one module, so a single patcher covers them all."""

    def __init__(self, components: dict[str, nn.Module], dtype: torch.dtype) -> None:
        super().__init__(components)
        self._dtype = dtype

    def get_dtype(self) -> torch.dtype:
        return self._dtype


def _patcher_class() -> type:
    """A ModelPatcher that unloads all-or-nothing: our modules cannot run half on the CPU."""
    base = comfy_module("comfy.model_patcher").ModelPatcher

    class InternVLUModelPatcher(base):  # type: ignore[misc, valid-type]
        # ComfyUI >= 0.3.6x passes force_patch_weights (e.g. from partially_load); accept every form.
        def partially_unload(self, device_to: Any, memory_to_free: int = 0, force_patch_weights: bool = False) -> int:
            return 0

    return InternVLUModelPatcher


def make_patcher(pipe: Any, load_device: torch.device, offload_device: torch.device) -> Any | None:
    """A patcher for ``pipe`` when running inside ComfyUI, else None."""
    if comfy_module("comfy.model_patcher") is None:
        return None
    modules = PipelineModules(dict(pipe.components), pipe.dtype)
    return _patcher_class()(modules, load_device, offload_device, size=pipe.model_size_bytes())


def load(patcher: Any) -> None:
    """Have ComfyUI put the model on its load device, evicting other models if needed."""
    mm = comfy_module("comfy.model_management")
    mm.load_models_gpu([patcher], force_full_load=True)


def unload(patcher: Any) -> bool:
    """Move the model to its offload device and drop it from ComfyUI's loaded list."""
    mm = comfy_module("comfy.model_management")
    for index, entry in enumerate(list(mm.current_loaded_models)):
        if entry.model is patcher:
            entry.model_unload()
            mm.current_loaded_models.pop(index)
            mm.soft_empty_cache()
            return True
    return False


def empty_cache() -> None:
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()
