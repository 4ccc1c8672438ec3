"""Offloading: run on a GPU smaller than the model, keeping the weights in CPU memory.

Three rungs, from the fastest to the one that needs the least GPU memory:

``model``
    Each component (VLM, generation decoder, VAE) moves to the GPU whole while it runs; the others
    go back to the CPU. Needs the largest component plus its activations.
``group``
    The repeated blocks (ViT layers, LLM layers, DiT blocks) stay in CPU memory and move to the GPU
    one block at a time through diffusers' block-level group-offloading hooks; the LLM's and the
    DiT's blocks are prefetched on a CUDA stream while the previous block computes. The rest of the
    running component (embeddings, heads, norms, projectors) and the VAE move whole.
``sequential``
    Every layer moves to the GPU only for its own call (diffusers' leaf-level hooks, synchronous
    copies): the least GPU memory, the slowest. The VAE and the LLM's embedding still move whole.

The hooks are diffusers' (``diffusers.hooks.apply_group_offloading``), which work on any torch
module, so the transformers LLM and our ViT use them like the DiT does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import validation as check
from .errors import InvalidInputError, InvalidInputTypeError
from .options import OFFLOAD_MODE_HELP, OFFLOAD_MODES

MODES = OFFLOAD_MODES  # the names and help texts live in .options (importable without torch)
MODE_HELP = OFFLOAD_MODE_HELP
_CPU = torch.device("cpu")
# The LLM's children that move whole in group and sequential mode (see _hook): the embedding (and
# with it the tied LM head) and the rotary table.
_LLM_RESIDENT = ("embed_tokens", "rotary_emb")


def check_mode(value, names: check.ArgumentNames = check.API_NAMES) -> str | None:
    """The offload mode name, or None for no offloading (``True`` means ``"model"``, the historical flag)."""
    if value is None or value is False:
        return None
    if value is True:
        return "model"
    if not isinstance(value, str):
        raise InvalidInputTypeError(f"{names.offload} must be one of {', '.join(MODES)} or None, got {type(value).__name__}")
    mode = value.strip().lower()
    if mode in ("", "none", "off"):
        return None
    if mode not in MODES:
        raise InvalidInputError(
            f"{names.setting('offload', value)} is not an offload mode; use one of {', '.join(MODES)} (or none)"
        )
    return mode


def check_device(mode: str, device, names: check.ArgumentNames = check.API_NAMES, option: str | None = None):
    """The GPU that ``mode`` moves weights to; refuses CPU-only machines and ``device='cpu'``."""
    return check.offload_device(device, option or names.setting("offload", mode), names)


@dataclass
class Offloader:
    """The offloading state of a pipeline: where components run, and which modules the hooks own."""

    mode: str
    device: torch.device
    hooked: tuple[nn.Module, ...]  # modules whose weights diffusers' hooks move; never moved as a whole
    owners: tuple[nn.Module, ...]  # the modules the hooks were applied to (they carry hooks themselves)

    def activate(self, components: Mapping[str, nn.Module], running: nn.Module | None) -> torch.device:
        """Put ``running``'s whole-moving parts on the device and every other component's on the CPU.

        ``running=None`` puts everything on the CPU (the hooks keep their blocks there between calls).
        """
        hooked = {id(m) for m in self.hooked}
        for module in components.values():
            if module is not running:
                move_except(module, hooked, _CPU)
        if running is not None:
            move_except(running, hooked, self.device)
        return self.device

    def remove(self) -> None:
        """Take the hooks off (the weights are then wherever the hooks last left them)."""
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.group_offloading import (
            _GROUP_OFFLOADING,
            _LAYER_EXECUTION_TRACKER,
            _LAZY_PREFETCH_GROUP_OFFLOADING,
        )

        for owner in self.owners:
            registry = HookRegistry.check_if_exists_or_initialize(owner)
            for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
                registry.remove_hook(name, recurse=True)


def attach(components: Mapping[str, nn.Module], mode: str, device: torch.device) -> Offloader:
    """Move every component to the CPU and install the hooks of ``mode``, onloading to ``device``.

    ``device`` is a checked accelerator (:func:`check_device`); the tests pass the CPU to check that
    the hooks change nothing in the results.
    """
    for module in components.values():
        module.to(_CPU)
    hooked: list[nn.Module] = []
    owners: list[nn.Module] = []
    vlm, decoder = components.get("vlm"), components.get("generation_decoder")
    stream = device.type == "cuda"
    if mode == "group":
        if vlm is not None:
            # The ViT's encoder holds only its layers and is never called itself: diffusers' stream
            # prefetching needs a calling parent, so its blocks move synchronously.
            owners += [vlm.vision_model.encoder, vlm.language_model.model]
            hooked += _hook(vlm.vision_model.encoder, device, "block_level", keep=(), use_stream=False)
            hooked += _hook(vlm.language_model.model, device, "block_level", keep=_LLM_RESIDENT, use_stream=stream)
        if decoder is not None:
            dit = decoder.decoder
            dit.enable_group_offload(
                onload_device=device, offload_type="block_level", num_blocks_per_group=1, use_stream=stream
            )
            owners.append(dit)
            hooked.append(dit)
    elif mode == "sequential":
        parts = [(vlm.vision_model, ()), (vlm.mlp1, ()), (vlm.language_model.model, _LLM_RESIDENT)] if vlm else []
        parts += [(decoder.decoder, ())] if decoder is not None else []
        for part, keep in parts:
            owners.append(part)
            hooked += _hook(part, device, "leaf_level", keep=keep, use_stream=False)
    elif mode != "model":
        raise InvalidInputError(f"offload mode {mode!r} is not one of {', '.join(MODES)}")
    return Offloader(mode, device, tuple(hooked), tuple(owners))


def _hook(owner: nn.Module, device: torch.device, offload_type: str, keep: Iterable[str], use_stream: bool):
    """diffusers' group offloading on ``owner`` (blocks or leaves); its children named in ``keep`` move whole.

    The kept children are hidden while the hooks are built, so they stay outside every group. Returns
    the hooked modules (``owner`` itself when nothing is kept). The LLM keeps its embedding: it runs
    outside the LLM's forward, the released head is tied to it, and transformers' ``generate`` puts its
    tensors on the device of this first parameter.
    """
    from diffusers.hooks import apply_group_offloading

    order = list(owner._modules)
    kept = {name: owner._modules.pop(name) for name in keep if name in owner._modules}
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    try:
        apply_group_offloading(owner, onload_device=device, offload_type=offload_type, use_stream=use_stream, **options)
    finally:
        owner._modules.update(kept)
        owner._modules = {name: owner._modules[name] for name in order}
    if not kept and offload_type == "leaf_level":
        return [owner]
    return [child for name, child in owner.named_children() if name not in kept]


def move_except(module: nn.Module, hooked: set[int], device: torch.device) -> None:
    """``module.to(device)`` for everything outside the modules whose ids are in ``hooked`` (left where they are)."""
    if id(module) in hooked:
        return
    if not any(id(sub) in hooked for sub in module.modules()):
        module.to(device)
        return
    for child in module.children():
        move_except(child, hooked, device)
    for param in module._parameters.values():
        if param is not None and param.device != device:
            param.data = param.data.to(device)
    for name, buffer in module._buffers.items():
        if buffer is not None and buffer.device != device:
            module._buffers[name] = buffer.to(device)
