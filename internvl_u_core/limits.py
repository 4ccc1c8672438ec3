"""The bounds and defaults of every argument, stated once.

The CLI, the ComfyUI nodes' widgets and the agent tools' schemas are all derived from
:data:`DEFAULT_LIMITS` and the defaults below; ``pipe.limits`` starts as a copy of it and can be
changed per deployment. This module imports nothing heavy (no torch).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

#: Denoising steps when the caller gives none (the reference's default).
DEFAULT_STEPS = 20
#: ``(all_cfg_scale, part_cfg_scale)`` per generation mode: plain drawing, and drawing after reasoning.
DEFAULT_GUIDANCE = {"image": (4.5, 2.0), "text_image": (3.5, 1.5)}
#: Longest answer of ``understand`` and longest chain of thought of ``reason``, in tokens.
DEFAULT_ANSWER_TOKENS = 256
DEFAULT_REASONING_TOKENS = 200
#: Randomly drawn seeds stay below this, so they are short to read back and retype.
RANDOM_SEED_BOUND = 2**32


@dataclass
class Limits:
    """Bounds on what one call may ask for."""

    min_side: int = 16  # pixels per side of a requested image (smaller sizes are refused)
    max_side: int = 4096  # pixels per side of a requested image
    max_pixels: int = 4096 * 4096  # requested width × height
    max_steps: int = 1000
    max_guidance_scale: float = 30.0  # guidance scales are in [0, this]
    min_flow_shift: float = 0.01  # the scheduler's time shift is in [this, max_flow_shift]
    max_flow_shift: float = 100.0  # larger shifts squeeze every timestep onto 1000 and break the schedule
    max_timestep_trunc: float = 1000.0  # guidance renormalisation threshold in [-this, this] (<= 0: never)
    max_output_images: int = 64  # images drawn per prompt in one call
    max_seed: int = 2**64 - 1
    max_new_tokens: int = 32768
    max_num_beams: int = 16
    max_images_per_prompt: int = 16  # input images
    max_input_pixels: int = 64_000_000  # larger input images are downscaled to this many pixels
    max_input_file_pixels: int = 256_000_000  # image files claiming more are refused before decoding
    max_prompt_chars: int = 200_000  # checked before tokenising
    max_prompt_tokens: int | None = None  # None: the model's context length

    def describe(self) -> dict:
        """The bounds as JSON-ready ``{name: value}`` (what a server shows its clients)."""
        return dict(vars(self))


#: The bounds every surface starts from; change a field here and the CLI, nodes and tools follow.
DEFAULT_LIMITS = Limits()


def random_seed() -> int:
    """A fresh seed for a call that gave none (reported back so the result can be reproduced)."""
    return secrets.randbelow(RANDOM_SEED_BOUND)
