"""Adapters for the LoRA tests, written in our file format from seeded random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from internvl_u_core import lora

SMALL_TARGETS = ("to_q", "to_v", "add_k_proj", "img_mlp.net.2")


def dit_adapter(pipe, path: Path, *, seed: int = 0, rank: int = 4, std: float = 0.3, zero_b: bool = False,
                targets=SMALL_TARGETS, alpha: float | None = None, trigger_words=()) -> Path:
    """A DiT adapter file: random ``lora_A``/``lora_B`` on the layers ending in ``targets``."""
    dit = pipe.generation_decoder.decoder
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(targets)):
            weights[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * std
            b = torch.randn(module.out_features, rank, generator=generator) * std
            weights[f"transformer.{name}.lora_B.weight"] = torch.zeros_like(b) if zero_b else b
    return write(pipe, path, weights, rank, alpha if alpha is not None else rank, targets, trigger_words)


def write(pipe, path: Path, weights: dict, rank: int, alpha: float, targets, trigger_words=(), part="transformer"):
    info = lora.AdapterInfo(rank=rank, alpha=alpha, target_modules=tuple(targets),
                            architecture=lora.architecture_signature(pipe), base_model="internvlu-tiny",
                            trigger_words=tuple(trigger_words), components=(part,))
    config = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    return lora.save_adapter(path, weights, info, {part: config})


def combined_adapter(pipe, path: Path, first: Path, second: Path, scales=(1.0, 1.0)) -> Path:
    """One adapter equal to ``first`` and ``second`` at ``scales``: their ranks stacked (rank = alpha)."""
    a, _ = lora.read_adapter(first)
    b, _ = lora.read_adapter(second)
    weights = {}
    for key in a:
        if key.endswith("lora_A.weight"):
            weights[key] = torch.cat([a[key], b[key]])
        else:
            weights[key] = torch.cat([a[key] * scales[0], b[key] * scales[1]], dim=1)
    rank = next(v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight"))
    return write(pipe, path, weights, rank, rank, SMALL_TARGETS)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])
