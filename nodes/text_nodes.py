"""The Understand (image question answering) and Reason (chain of thought) nodes."""

from __future__ import annotations

from typing import Any

from .callbacks import token_callback
from .common_inputs import (
    model_input,
    more_images_input,
    system_prompt_input,
    text_generation_inputs,
)
from .core_import import core
from .images import collect_images
from .model_handle import InternVLUModel
from .schema import NODE_ID_PREFIX, REASONING_TYPE, InputSpec, NodeResult, NodeSpec, OutputSpec


def _sampling(
    max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, num_beams: int, seed: int
) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_p": top_p,
        "num_beams": num_beams,
        "seed": seed,
        "token_callback": token_callback(max_new_tokens),
    }


def understand(
    model: InternVLUModel,
    image: Any,
    question: str,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    num_beams: int,
    seed: int,
    more_images: Any = None,
    system_prompt: str | None = None,
) -> NodeResult:
    """Answer a question about one or several images."""
    images = collect_images(image, more_images)
    with model.use() as pipe:
        answer = pipe.understand(
            images,
            question,
            system_prompt=system_prompt or None,
            **_sampling(max_new_tokens, do_sample, temperature, top_p, num_beams, seed),
        )
    return NodeResult((answer,), text=answer)


UNDERSTAND = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}Understand",
    display_name="InternVL-U Understand",
    description="Answer a question about images. A batch of several images is one question "
    "about all of them (e.g. 'what differs?').",
    inputs=(
        model_input(),
        InputSpec(
            "image",
            "IMAGE",
            "The image, or a batch of images asked about together.",
        ),
        InputSpec(
            "question",
            "STRING",
            "The question or instruction about the image(s).",
            default="Describe this image in detail.",
            multiline=True,
        ),
        *text_generation_inputs(core().limits.DEFAULT_ANSWER_TOKENS),
        more_images_input(),
        system_prompt_input(),
    ),
    outputs=(OutputSpec("answer", "STRING", "The model's answer."),),
    run=understand,
    output_node=True,
)


def reason(
    model: InternVLUModel,
    prompt: str,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    num_beams: int,
    seed: int,
    image: Any = None,
    more_images: Any = None,
    system_prompt: str | None = None,
) -> NodeResult:
    """Think about a generation or edit request before making the image."""
    images = collect_images(image, more_images)
    with model.use() as pipe:
        reasoning = pipe.reason(
            prompt,
            images,
            system_prompt=system_prompt or None,
            **_sampling(max_new_tokens, do_sample, temperature, top_p, num_beams, seed),
        )
    return NodeResult((reasoning, reasoning.text), text=reasoning.text)


REASON = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}Reason",
    display_name="InternVL-U Reason",
    description="Write a chain of thought for a text-to-image prompt (no image) or an edit "
    "instruction (with the image to edit). Feed 'reasoning' to Generate or Edit for the "
    "reasoning-guided mode.",
    inputs=(
        model_input(),
        InputSpec(
            "prompt",
            "STRING",
            "The image prompt, or the edit instruction when images are connected.",
            default="",
            multiline=True,
        ),
        *text_generation_inputs(core().limits.DEFAULT_REASONING_TOKENS),
        InputSpec(
            "image",
            "IMAGE",
            "For editing: the image(s) to edit. Leave empty for text-to-image.",
            optional=True,
        ),
        more_images_input(),
        system_prompt_input(),
    ),
    outputs=(
        OutputSpec(
            "reasoning",
            REASONING_TYPE,
            "The reasoning, for the 'reasoning' input of InternVL-U Generate or Edit.",
        ),
        OutputSpec("text", "STRING", "The chain of thought as text."),
    ),
    run=reason,
    output_node=True,
)
