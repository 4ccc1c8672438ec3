"""The Generate (text-to-image) and Edit (image editing) nodes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .callbacks import StepCallback
from .common_inputs import (
    diffusion_inputs,
    model_input,
    more_images_input,
    reasoning_input,
    size_inputs,
    system_prompt_input,
)
from .images import collect_images, pils_to_tensor
from .model_handle import ModelHandle
from .schema import LATENT_TYPE, NODE_ID_PREFIX, InputSpec, NodeResult, NodeSpec, OutputSpec

log = logging.getLogger(__name__)

CUSTOM_SIZE = "custom (width x height)"
SAME_AS_INPUT = "same as input"
#: About one megapixel per aspect ratio, on the 32-pixel grid (the VAE's 8x times the transformer's
#: 2x2 patches is 16; 32 keeps both sides even in patches): the sizes the released model was trained around.
PRESET_SIZES = {
    "1:1 (1024x1024)": (1024, 1024),
    "4:3 (1152x864)": (1152, 864),
    "3:4 (864x1152)": (864, 1152),
    "3:2 (1248x832)": (1248, 832),
    "2:3 (832x1248)": (832, 1248),
    "16:9 (1344x768)": (1344, 768),
    "9:16 (768x1344)": (768, 1344),
    "21:9 (1568x672)": (1568, 672),
    "9:21 (672x1568)": (672, 1568),
}


def _prompt_with_reasoning(prompt: str, reasoning: Any, name: str) -> str:
    """An empty prompt takes the reasoning's; a different one is allowed but logged."""
    if reasoning is None:
        return prompt
    if not prompt.strip():
        return reasoning.prompt
    if prompt != reasoning.prompt:
        log.warning("InternVL-U: the %s differs from the one the reasoning was made for", name)
    return prompt


def _size(resolution: str, width: int, height: int) -> tuple[int, int]:
    """(width, height) for a resolution choice; 0 means "the default" (checkpoint's or input's)."""
    if resolution in PRESET_SIZES:
        return PRESET_SIZES[resolution]
    if resolution == SAME_AS_INPUT:
        return 0, 0
    return width, height


def _draw(
    model: ModelHandle,
    steps: int,
    all_cfg_scale: float,
    part_cfg_scale: float,
    seed: int,
    batch_size: int,
    reasoning: Any,
    system_prompt: str | None,
    job: Callable[..., list[Any]],
) -> NodeResult:
    """Run ``job(pipe, **sampling)`` (a ``pipe.generate``/``pipe.edit`` call) in one use of the model;
    outputs the images and the final latents as a ComfyUI LATENT."""
    with model.use() as pipe:
        callback = StepCallback(pipe, steps)
        images = job(
            pipe,
            steps=steps,
            all_cfg_scale=all_cfg_scale or None,
            part_cfg_scale=part_cfg_scale or None,
            seed=seed,
            num_images=batch_size,
            reasoning=reasoning,
            system_prompt=system_prompt or None,
            callback=callback,
        )
        latent = model.to_comfy_latent(pipe, callback.latents)
    return NodeResult((pils_to_tensor(images), latent))


def _outputs(what: str) -> tuple[OutputSpec, ...]:
    return (
        OutputSpec("images", "IMAGE", f"The {what} image batch."),
        OutputSpec(
            "latent",
            LATENT_TYPE,
            f"The {what} images as latents of the Qwen-Image VAE (ComfyUI's format for "
            "qwen_image_vae.safetensors), for core nodes such as VAE Decode, tiled decode or latent upscale.",
        ),
    )


def generate(
    model: ModelHandle,
    prompt: str,
    resolution: str,
    width: int,
    height: int,
    steps: int,
    all_cfg_scale: float,
    part_cfg_scale: float,
    seed: int,
    batch_size: int,
    reasoning: Any = None,
    system_prompt: str | None = None,
) -> NodeResult:
    """Text-to-image, optionally guided by a Reason node's chain of thought."""
    width, height = _size(resolution, width, height)
    prompt = _prompt_with_reasoning(prompt, reasoning, "prompt")

    def draw(pipe: Any, **sampling: Any) -> list[Any]:
        return pipe.generate(prompt=prompt, width=width or None, height=height or None, **sampling)

    return _draw(model, steps, all_cfg_scale, part_cfg_scale, seed, batch_size, reasoning, system_prompt, draw)


GENERATE = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}Generate",
    display_name="InternVL-U Generate",
    description="Text-to-image. Connect a Reason node for the reasoning-guided mode.",
    inputs=(
        model_input(),
        InputSpec(
            "prompt",
            "STRING",
            "What to draw. May be left empty when 'reasoning' is connected.",
            default="",
            multiline=True,
        ),
        InputSpec(
            "resolution",
            "COMBO",
            "An aspect ratio at about one megapixel, or 'custom' to use width and height.",
            options=(CUSTOM_SIZE, *PRESET_SIZES),
            default=CUSTOM_SIZE,
        ),
        *size_inputs("the checkpoint's default size", 1024),
        *diffusion_inputs(),
        reasoning_input(),
        system_prompt_input(),
    ),
    outputs=_outputs("generated"),
    run=generate,
)


def edit(
    model: ModelHandle,
    instruction: str,
    resolution: str,
    width: int,
    height: int,
    steps: int,
    all_cfg_scale: float,
    part_cfg_scale: float,
    seed: int,
    batch_size: int,
    image: Any = None,
    image_latent: Any = None,
    more_images: Any = None,
    reasoning: Any = None,
    system_prompt: str | None = None,
) -> NodeResult:
    """Edit one image (or combine several reference images) following an instruction."""
    images = collect_images(image, more_images) or []
    if image_latent is None and not images:
        raise ValueError("InternVL-U Edit needs an image to edit: connect 'image' or 'image_latent'")
    width, height = _size(resolution, width, height)
    instruction = _prompt_with_reasoning(instruction, reasoning, "instruction")

    def draw(pipe: Any, **sampling: Any) -> list[Any]:
        # A latent is decoded in the same use of the model as the edit (one move to the device, not two).
        pictures = images if image_latent is None else model.images_from_comfy_latent(pipe, image_latent) + images
        out_width, out_height = width, height
        if bool(width) != bool(height):  # one side given: the other comes from the first input image
            out_width, out_height = width or pictures[0].width, height or pictures[0].height
        return pipe.edit(
            images=pictures, instruction=instruction, width=out_width or None, height=out_height or None, **sampling
        )

    return _draw(model, steps, all_cfg_scale, part_cfg_scale, seed, batch_size, reasoning, system_prompt, draw)


EDIT = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}Edit",
    display_name="InternVL-U Edit",
    description="Edit an image following an instruction; several reference images are allowed. "
    "Connect a Reason node (given the same image) for the reasoning-guided mode.",
    inputs=(
        model_input(),
        InputSpec(
            "instruction",
            "STRING",
            "The edit to make. May be left empty when 'reasoning' is connected.",
            default="",
            multiline=True,
        ),
        InputSpec(
            "resolution",
            "COMBO",
            "Output size: the (first) input image's, an aspect ratio at about one megapixel, or "
            "'custom' to use width and height (0 there takes the input's side).",
            options=(SAME_AS_INPUT, CUSTOM_SIZE, *PRESET_SIZES),
            default=SAME_AS_INPUT,
        ),
        *size_inputs("the (first) input image's size", 0),
        *diffusion_inputs(),
        InputSpec(
            "image",
            "IMAGE",
            "The image to edit, or a batch of reference images. Connect this or 'image_latent'.",
            optional=True,
        ),
        InputSpec(
            "image_latent",
            LATENT_TYPE,
            "An image to edit as a Qwen-Image VAE latent (e.g. from Generate's 'latent' after a latent "
            "upscale); decoded with the model's VAE and placed before 'image'.",
            optional=True,
        ),
        more_images_input(),
        reasoning_input(),
        system_prompt_input(),
    ),
    outputs=_outputs("edited"),
    run=edit,
)
