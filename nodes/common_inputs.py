"""Input declarations shared by several nodes; every bound and default comes from the core's limits."""

from __future__ import annotations

from .core_import import core
from .schema import MODEL_TYPE, REASONING_TYPE, InputSpec


def _limits():
    """The core's ``DEFAULT_LIMITS`` (what ``pipe.limits`` starts from)."""
    return core().DEFAULT_LIMITS


def model_input() -> InputSpec:
    return InputSpec("model", MODEL_TYPE, "The InternVL-U model from an 'InternVL-U Loader' node.")


def more_images_input() -> InputSpec:
    return InputSpec(
        "more_images",
        "IMAGE",
        "Optional further images, appended after 'image'. Use it for images of another size, "
        "which cannot share one IMAGE batch.",
        optional=True,
    )


def system_prompt_input() -> InputSpec:
    return InputSpec(
        "system_prompt",
        "STRING",
        "Optional system prompt replacing the model's default one.",
        optional=True,
        force_input=True,
    )


def seed_input(tooltip: str, control: str) -> InputSpec:
    return InputSpec(
        "seed", "INT", tooltip, default=0, min=0, max=_limits().max_seed, control_after_generate=control
    )


def text_generation_inputs(max_new_tokens: int) -> list[InputSpec]:
    """Length and sampling controls of the token-generating nodes."""
    limits = _limits()
    return [
        InputSpec(
            "max_new_tokens",
            "INT",
            "The most tokens to generate; generation also stops at the end-of-answer token.",
            default=max_new_tokens,
            min=1,
            max=limits.max_new_tokens,
        ),
        InputSpec(
            "do_sample",
            "BOOLEAN",
            "Off: greedy decoding (deterministic). On: sample with temperature and top-p.",
            default=False,
        ),
        InputSpec(
            "temperature",
            "FLOAT",
            "Sampling temperature (only with do_sample): higher is more varied.",
            default=1.0,
            min=0.01,
            max=5.0,
            step=0.01,
        ),
        InputSpec(
            "top_p",
            "FLOAT",
            "Nucleus sampling (only with do_sample): keep the most likely tokens up to this mass.",
            default=1.0,
            min=0.01,
            max=1.0,
            step=0.01,
        ),
        InputSpec(
            "num_beams",
            "INT",
            "Beam-search width; 1 disables beam search.",
            default=1,
            min=1,
            max=limits.max_num_beams,
        ),
        seed_input("Random seed for sampling (unused by greedy decoding).", control="fixed"),
    ]


def size_inputs(zero_means: str, default: int) -> list[InputSpec]:
    limits = _limits()
    return [
        InputSpec(
            name,
            "INT",
            f"Output {name} in pixels; 0 uses {zero_means}. Any size from {limits.min_side} to "
            f"{limits.max_side} works.",
            default=default,
            min=0,
            max=limits.max_side,
            step=16,
        )
        for name in ("width", "height")
    ]


def diffusion_inputs() -> list[InputSpec]:
    """Sampling controls shared by Generate and Edit."""
    limits, defaults = _limits(), core().limits
    (plain_all, plain_part), (reasoned_all, reasoned_part) = (
        defaults.DEFAULT_GUIDANCE["image"],
        defaults.DEFAULT_GUIDANCE["text_image"],
    )
    return [
        InputSpec(
            "steps", "INT", "Number of denoising steps.", default=defaults.DEFAULT_STEPS, min=1, max=limits.max_steps
        ),
        InputSpec(
            "all_cfg_scale",
            "FLOAT",
            "Guidance scale of the full condition against no condition. 0 = model default "
            f"({plain_all}, or {reasoned_all} with reasoning).",
            default=0.0,
            min=0.0,
            max=limits.max_guidance_scale,
            step=0.1,
        ),
        InputSpec(
            "part_cfg_scale",
            "FLOAT",
            "Guidance scale of the partial condition (image only, or text only). 0 = model "
            f"default ({plain_part}, or {reasoned_part} with reasoning).",
            default=0.0,
            min=0.0,
            max=limits.max_guidance_scale,
            step=0.1,
        ),
        seed_input("Random seed of the initial noise.", control="randomize"),
        InputSpec(
            "batch_size", "INT", "How many images to make in one run.", default=1, min=1, max=limits.max_output_images
        ),
    ]


def reasoning_input() -> InputSpec:
    return InputSpec(
        "reasoning",
        REASONING_TYPE,
        "Optional chain of thought from an 'InternVL-U Reason' node (reasoning-guided mode). "
        "Leave the prompt/instruction empty to use the one the reasoning was made for.",
        optional=True,
    )
