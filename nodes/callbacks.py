"""Core callbacks that drive ComfyUI's progress bar, latent previews and Cancel button."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .comfy_runtime import Progress, check_interrupt, preview_settings


def step_callback(pipe: Any, steps: int) -> Callable[[int, int, Any], None]:
    """For ``generate``/``edit``: one progress tick (with a preview if enabled) per denoising step."""
    progress = Progress(steps)
    previews, max_size = preview_settings()

    def on_step(step: int, total: int, latents: Any) -> None:
        check_interrupt()
        preview = ("JPEG", pipe.decode_latents_preview(latents), max_size) if previews else None
        progress.update(step, total, preview)

    return on_step


def token_callback(max_new_tokens: int) -> Callable[[int, int], None]:
    """For ``understand``/``reason``: one progress tick per generated token."""
    progress = Progress(max_new_tokens)

    def on_token(generated: int, maximum: int) -> None:
        check_interrupt()
        progress.update(generated, maximum)

    return on_token
