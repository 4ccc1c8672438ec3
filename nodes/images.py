"""Conversions between ComfyUI IMAGE tensors ([B, H, W, C] float32 in 0..1) and PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def tensor_to_pils(images: torch.Tensor) -> list[Image.Image]:
    """Split an IMAGE batch into RGB PIL images (values rounded, so a PNG round-trips exactly)."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE tensor [B, H, W, C], got shape {tuple(images.shape)}")
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    result = []
    for frame in pixels:
        if frame.shape[-1] == 1:
            frame = np.repeat(frame, 3, axis=-1)
        result.append(Image.fromarray(np.ascontiguousarray(frame[..., :3])))
    return result


def pils_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Stack same-sized PIL images into an IMAGE batch."""
    if not images:
        raise ValueError("no images to convert")
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays))


def collect_images(*batches: torch.Tensor | None) -> list[Image.Image] | None:
    """All frames of the given IMAGE inputs as one list of PIL images (None when there are none)."""
    result: list[Image.Image] = []
    for batch in batches:
        if batch is not None:
            result.extend(tensor_to_pils(batch))
    return result or None
