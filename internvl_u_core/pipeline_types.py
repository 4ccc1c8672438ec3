"""The values that travel through the pipeline: requests, settings, conditioning, reasonings, outputs.

Plain data with their own checks; the jobs (``pipeline_text``, ``pipeline_images``) build and read them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from . import validation as check
from .errors import InvalidInputError, InvalidInputTypeError
from .sampling import FLOW_SHIFT, RENORM_TIMESTEP, StepCallback

logger = logging.getLogger("internvl_u_core")


TEXT_KWARGS = (
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "num_beams",
    "return_dict_in_generate", "output_hidden_states",
)


DIFFUSION_KWARGS = (
    "num_inference_steps", "num_images_per_prompt", "all_cfg_scale", "part_cfg_scale",
    "height", "width", "generator", "timestep_trunc", "flow_shift",
)


@dataclass
class InternVLUPipelineOutput:
    """What a reference-style call returns."""

    generate_output: torch.LongTensor | None = None  # new token ids [n, T] (text modes)
    text: list[str] | None = None  # decoded ``generate_output``, special tokens skipped
    images: list[Image.Image] | None = None


@dataclass(frozen=True)
class DiffusionSettings:
    """A validated image request: output size, steps, copies per prompt, guidance and noise source."""

    height: int
    width: int
    steps: int
    images_per_prompt: int
    all_cfg_scale: float
    part_cfg_scale: float
    generator: torch.Generator | list[torch.Generator] | None
    timestep_trunc: float = RENORM_TIMESTEP  # guidance renormalised at integer timesteps above it (<= 0: never)
    flow_shift: float = FLOW_SHIFT


@dataclass(frozen=True)
class Conditioning:
    """What the decoder is conditioned on, one entry per guidance row (full, part, uncond × prompts)."""

    spans: list[tuple[torch.Tensor, torch.Tensor]]  # the row's VLM features and their image-token mask
    image_fhw: list[torch.Tensor]  # ViT grid (frames, h, w) of each input image of the row
    references: list[torch.Tensor | None]  # VAE latents of the row's input images
    reference_grids: list[torch.Tensor | None]  # their latent grids
    target_grid: torch.Tensor  # [rows, 3] latent grid of the image to draw
    uncond_equals_part: bool  # no input images: the two dropped rows are one prompt, computed once


@dataclass(frozen=True)
class Reasoning:
    """A chain-of-thought from :meth:`InternVLUPipeline.reason`, reusable by ``generate``/``edit``."""

    text: str
    token_ids: tuple[int, ...]  # raw generated ids, stop token included, as the reference returns them
    prompt: str
    num_images: int
    system_prompt: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready fields (how a server sends a reasoning and takes it back)."""
        return {"text": self.text, "token_ids": list(self.token_ids), "prompt": self.prompt,
                "num_images": self.num_images, "system_prompt": self.system_prompt}

    @classmethod
    def from_dict(cls, data, name: str = "reasoning") -> Reasoning:
        """The inverse of :meth:`to_dict`; a malformed ``data`` raises an error naming the bad field."""
        if not isinstance(data, dict):
            raise InvalidInputTypeError(f"{name} must be an object with text, token_ids, prompt and num_images")
        ids, images, system = data.get("token_ids"), data.get("num_images", 0), data.get("system_prompt")
        if not isinstance(data.get("text"), str) or not isinstance(data.get("prompt", ""), str):
            raise InvalidInputTypeError(f"{name}.text and {name}.prompt must be strings")
        ids = check.token_ids(ids, f"{name}.token_ids")
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise InvalidInputError(f"{name}.num_images must be a non-negative integer, got {images!r}")
        if system is not None and not isinstance(system, str):
            raise InvalidInputTypeError(f"{name}.system_prompt must be a string or null")
        return cls(data["text"], ids, data.get("prompt", ""), images, system)


def check_reasoning(reasoning, num_images: int, name: str = "reasoning") -> None:
    """A ``reasoning`` argument is None or a :class:`Reasoning` made for as many input images as the call has."""
    if reasoning is None:
        return
    if not isinstance(reasoning, Reasoning):
        raise InvalidInputError(f"{name} must be a Reasoning from reason(...), got {type(reasoning).__name__}")
    if reasoning.num_images != num_images:
        raise InvalidInputError(
            f"{name} was made for {reasoning.num_images} input image(s) but {num_images} were given; "
            "call reason() with the same images"
        )


@dataclass(frozen=True)
class ImageRequest:
    """The drawing options of ``generate``/``edit`` as the caller gave them (``None``: the default)."""

    width: int | None
    height: int | None
    steps: int
    all_cfg_scale: float | None
    part_cfg_scale: float | None
    timestep_trunc: float | None
    flow_shift: float | None
    seed: int | None
    generator: torch.Generator | None
    num_images: int
    reasoning: Reasoning | None
    system_prompt: str | None
    callback: StepCallback | None


def _split_kwargs(kwargs: dict, mode: str) -> tuple[dict, dict]:
    text, diffusion = {}, {}
    for key, value in kwargs.items():
        if key in TEXT_KWARGS:
            if mode != "image":
                text[key] = value
        elif key in DIFFUSION_KWARGS:
            if mode != "text":
                diffusion[key] = value
        else:
            logger.warning("ignoring unsupported argument %r (the reference pipeline drops it too)", key)
    return text, diffusion

