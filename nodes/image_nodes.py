"""The Generate (text-to-image) and Edit (image editing) nodes."""

from __future__ import annotations

import logging
from typing import Any

from .callbacks import step_callback
from .common_inputs import (
    diffusion_inputs,
    model_input,
    more_images_input,
    reasoning_input,
    size_inputs,
    system_prompt_input,
)
from .images import collect_images, pils_to_tensor
from .model_handle import InternVLUModel
from .schema import NODE_ID_PREFIX, InputSpec, NodeResult, NodeSpec, OutputSpec

log = logging.getLogger(__name__)


def _prompt_with_reasoning(prompt: str, reasoning: Any, name: str) -> str:
    """An empty prompt takes the reasoning's; a different one is allowed but logged."""
    if reasoning is None:
        return prompt
    if not prompt.strip():
        return reasoning.prompt
    if prompt != reasoning.prompt:
        log.warning("InternVL-U: the %s differs from the one the reasoning was made for", name)
    return prompt


def _diffusion_kwargs(
    pipe: Any,
    width: int,
    height: int,
    steps: int,
    all_cfg_scale: float,
    part_cfg_scale: float,
    seed: int,
    batch_size: int,
    reasoning: Any,
    system_prompt: str | None,
) -> dict[str, Any]:
    """Core keyword arguments; 0 means "the core's default" for sizes and guidance scales."""
    return {
        "width": width or None,
        "height": height or None,
        "steps": steps,
        "all_cfg_scale": all_cfg_scale or None,
        "part_cfg_scale": part_cfg_scale or None,
        "seed": seed,
        "num_images": batch_size,
        "reasoning": reasoning,
        "system_prompt": system_prompt or None,
        "callback": step_callback(pipe, steps),
    }


def generate(
    model: InternVLUModel,
    prompt: str,
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
    prompt = _prompt_with_reasoning(prompt, reasoning, "prompt")
    with model.use() as pipe:
        images = pipe.generate(
            prompt,
            **_diffusion_kwargs(
                pipe,
                width,
                height,
                steps,
                all_cfg_scale,
                part_cfg_scale,
                seed,
                batch_size,
                reasoning,
                system_prompt,
            ),
        )
    return NodeResult((pils_to_tensor(images),))


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
        *size_inputs("the checkpoint's default size", 1024),
        *diffusion_inputs(),
        reasoning_input(),
        system_prompt_input(),
    ),
    outputs=(OutputSpec("images", "IMAGE", "The generated image batch."),),
    run=generate,
)


def edit(
    model: InternVLUModel,
    image: Any,
    instruction: str,
    width: int,
    height: int,
    steps: int,
    all_cfg_scale: float,
    part_cfg_scale: float,
    seed: int,
    batch_size: int,
    more_images: Any = None,
    reasoning: Any = None,
    system_prompt: str | None = None,
) -> NodeResult:
    """Edit one image (or combine several reference images) following an instruction."""
    instruction = _prompt_with_reasoning(instruction, reasoning, "instruction")
    images = collect_images(image, more_images)
    if bool(width) != bool(height):  # one side given: the other comes from the first input image
        width, height = width or images[0].width, height or images[0].height
    with model.use() as pipe:
        results = pipe.edit(
            images,
            instruction,
            **_diffusion_kwargs(
                pipe,
                width,
                height,
                steps,
                all_cfg_scale,
                part_cfg_scale,
                seed,
                batch_size,
                reasoning,
                system_prompt,
            ),
        )
    return NodeResult((pils_to_tensor(results),))


EDIT = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}Edit",
    display_name="InternVL-U Edit",
    description="Edit an image following an instruction; several reference images are allowed. "
    "Connect a Reason node (given the same image) for the reasoning-guided mode.",
    inputs=(
        model_input(),
        InputSpec(
            "image",
            "IMAGE",
            "The image to edit, or a batch of reference images.",
        ),
        InputSpec(
            "instruction",
            "STRING",
            "The edit to make. May be left empty when 'reasoning' is connected.",
            default="",
            multiline=True,
        ),
        *size_inputs("the (first) input image's size", 0),
        *diffusion_inputs(),
        more_images_input(),
        reasoning_input(),
        system_prompt_input(),
    ),
    outputs=(OutputSpec("images", "IMAGE", "The edited image batch."),),
    run=edit,
)
