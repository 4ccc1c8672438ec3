"""The Understand (image question answering) and Reason (chain of thought) nodes."""

from __future__ import annotations

from typing import Any

from .callbacks import token_callback
from .comfy_runtime import Progress
from .common_inputs import (
    model_input,
    more_images_input,
    system_prompt_input,
    text_generation_inputs,
)
from .core_import import core
from .images import collect_images
from .model_handle import ModelHandle
from .schema import NODE_ID_PREFIX, REASONING_TYPE, InputSpec, NodeResult, NodeSpec, OutputSpec, list_rows


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
    }


#: The text nodes' sampling inputs, named as the core's arguments.
_SAMPLING = ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams", "seed")
#: Understand's inputs that are settings (everything but the images), for grouping per-image work.
_UNDERSTAND_SETTINGS = ("model", "question", *_SAMPLING, "system_prompt")


def understand(**lists: list[Any]) -> NodeResult:
    """Answer a question about images: one answer per call, or with ``per_image`` one per image.

    The node takes its inputs as lists (ComfyUI's ``is_input_list``) so that per-image mode sees
    every image of a list (e.g. a folder) at once: one progress bar over all of them, and images of
    equal size batched through the model. Calls are paired as ComfyUI pairs list inputs.
    """
    rows = list_rows(lists)
    each = iter(_understand_each([row for row in rows if row["per_image"]]))
    answers: list[str] = []
    for row in rows:
        if row["per_image"]:
            answers += next(each)
            continue
        with row["model"].use() as pipe:
            answers.append(
                pipe.understand(
                    collect_images(row["image"], row.get("more_images")),
                    row["question"],
                    system_prompt=row.get("system_prompt") or None,
                    token_callback=token_callback(row["max_new_tokens"]),
                    **{name: row[name] for name in _SAMPLING},
                )
            )
    return NodeResult((answers,), text="\n\n".join(answers))


def _understand_each(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One answer per image of each row (a list per row); rows with equal settings share one
    batched core call, and one progress bar counts every image."""
    images = [collect_images(row["image"], row.get("more_images")) for row in rows]
    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        key = tuple(id(row[k]) if k == "model" else row.get(k) for k in _UNDERSTAND_SETTINGS)
        groups.setdefault(key, []).append(index)
    total = sum(len(batch) for batch in images)
    progress = Progress(total)
    done = 0
    answers: list[list[str]] = [[] for _ in rows]
    for members in groups.values():
        row = rows[members[0]]
        pictures = [picture for index in members for picture in images[index]]

        def on_batch(finished: int, _: int, offset: int = done) -> None:
            progress.update(offset + finished, total)

        with row["model"].use() as pipe:
            flat = pipe.understand_each(
                pictures,
                row["question"],
                system_prompt=row.get("system_prompt") or None,
                token_callback=token_callback(None),
                image_callback=on_batch,
                **{name: row[name] for name in _SAMPLING},
            )
        done += len(pictures)
        for index in members:
            answers[index], flat = flat[: len(images[index])], flat[len(images[index]) :]
    return answers


UNDERSTAND = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}Understand",
    display_name="InternVL-U Understand",
    description="Answer a question about images. A batch of several images is one question "
    "about all of them (e.g. 'what differs?'); with 'per_image' each image gets its own answer "
    "(captioning), images of equal size batched through the model.",
    inputs=(
        model_input(),
        InputSpec(
            "image",
            "IMAGE",
            "The image, or a batch (or list) of images.",
        ),
        InputSpec(
            "question",
            "STRING",
            "The question or instruction about the image(s).",
            default="Describe this image in detail.",
            multiline=True,
        ),
        *text_generation_inputs(core().limits.DEFAULT_ANSWER_TOKENS),
        InputSpec(
            "per_image",
            "BOOLEAN",
            "Off: one answer about all images together. On: one answer per image (e.g. a caption "
            "for every image of a batch or folder), in image order.",
            default=False,
        ),
        more_images_input(),
        system_prompt_input(),
    ),
    outputs=(
        OutputSpec(
            "answer",
            "STRING",
            "The model's answer; with 'per_image', one answer per image (a list later nodes run once per item).",
            is_list=True,
        ),
    ),
    run=understand,
    output_node=True,
    input_is_list=True,
)


def reason(
    model: ModelHandle,
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
            token_callback=token_callback(max_new_tokens),
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
