"""Core callbacks that drive ComfyUI's progress bar, latent previews and Cancel button."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .comfy_runtime import Progress, check_interrupt, preview_settings


class StepCallback:
    """For ``generate``/``edit``: a progress tick (with a preview if enabled) per denoising step.

    It also keeps the latents of the last step, which are the final latents the images are
    decoded from (the nodes' LATENT output). A served model passes its ready-made preview (or
    ``None``) instead of latents; ``decode_latents_preview`` returns it as is. 16-channel latents
    are previewed through the Wan 2.1 latent-to-RGB table, the one ComfyUI uses for Qwen-Image.
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
        if self.previews and latents is not None:
            preview = ("JPEG", self.pipe.decode_latents_preview(latents), self.max_size)
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
