"""Core callbacks that drive ComfyUI's progress bar, latent previews and Cancel button."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from .comfy_runtime import Progress, check_interrupt, comfy_module, preview_settings


@cache
def _preview_factors() -> tuple[Any, Any]:
    """ComfyUI's own latent-to-RGB factors for the Wan 2.1 / Qwen-Image latent space, when it has them.

    Outside ComfyUI (or for a table it lacks) the core's copy of the same table is used.
    """
    formats = comfy_module("comfy.latent_formats")
    wan21 = getattr(formats, "Wan21", None) if formats is not None else None
    if wan21 is None or getattr(wan21, "latent_rgb_factors", None) is None:
        return None, None
    return wan21.latent_rgb_factors, wan21.latent_rgb_factors_bias


class StepCallback:
    """For ``generate``/``edit``: a progress tick (with a preview if enabled) per denoising step.

    It also keeps the latents of the last step, which are the final latents the images are
    decoded from (the nodes' LATENT output).
    """

    def __init__(self, pipe: Any, steps: int) -> None:
        self.pipe = pipe
        self.progress = Progress(steps)
        self.previews, self.max_size = preview_settings()
        self.latents: Any = None

    def __call__(self, step: int, total: int, latents: Any) -> None:
        check_interrupt()
        self.latents = latents
        preview = None
        if self.previews:
            factors, bias = _preview_factors() if latents.shape[1] == 16 else (None, None)
            preview = ("JPEG", self.pipe.decode_latents_preview(latents, factors, bias), self.max_size)
        self.progress.update(step, total, preview)


def token_callback(max_new_tokens: int | None) -> Callable[[int, int], None]:
    """For ``understand``/``reason``: one progress tick per generated token; with ``None`` only the
    interrupt check (when the node's bar counts images instead)."""
    progress = Progress(max_new_tokens) if max_new_tokens is not None else None

    def on_token(generated: int, maximum: int) -> None:
        check_interrupt()
        if progress is not None:
            progress.update(generated, maximum)

    return on_token
