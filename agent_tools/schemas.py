"""Argument schemas the agent's model sees (pydantic v2).

Every bound comes from the core's ``DEFAULT_LIMITS``; the toolkit's tighter policy
(`ToolLimits`) is checked when a call is prepared.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator

from internvl_u_core import DEFAULT_LIMITS
from internvl_u_core.limits import DEFAULT_ANSWER_TOKENS, DEFAULT_GUIDANCE, DEFAULT_REASONING_TOKENS, DEFAULT_STEPS

LIMITS = DEFAULT_LIMITS
_PLAIN_GUIDANCE, _REASONED_GUIDANCE = DEFAULT_GUIDANCE["image"], DEFAULT_GUIDANCE["text_image"]

ImageRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        description=(
            "An image_id from an earlier tool result (like 'img_3f9a1c0b7e2d') "
            "or the path of an image file inside the allowed folders."
        ),
    ),
]


class _AcceptsSingleImage(BaseModel):
    """Lets a model pass one image reference where a list is expected."""

    @field_validator("images", mode="before", check_fields=False)
    @classmethod
    def _wrap_single_image(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class UnderstandImageInput(_AcceptsSingleImage):
    """Arguments of `understand_image`."""

    images: list[ImageRef] = Field(
        min_length=1,
        max_length=LIMITS.max_images_per_prompt,
        description="The image(s) to look at, as image_ids or file paths.",
    )
    question: str = Field(
        min_length=1,
        max_length=LIMITS.max_prompt_chars,
        description="What to ask, e.g. 'Describe this picture.' or 'How many apples are there?'",
    )
    max_new_tokens: int = Field(
        default=DEFAULT_ANSWER_TOKENS, ge=1, le=LIMITS.max_new_tokens, description="Longest answer, in tokens."
    )


class ReasonInput(_AcceptsSingleImage):
    """Arguments of `reason`."""

    prompt: str = Field(
        min_length=1,
        max_length=LIMITS.max_prompt_chars,
        description=(
            "The image request to think through: a description of an image to create, "
            "or an edit instruction when `images` are given."
        ),
    )
    images: list[ImageRef] = Field(
        default_factory=list,
        max_length=LIMITS.max_images_per_prompt,
        description=(
            "Leave empty to plan a new image. To plan an edit, the image(s) that "
            "edit_image will get, in the same order."
        ),
    )
    max_new_tokens: int = Field(
        default=DEFAULT_REASONING_TOKENS, ge=1, le=LIMITS.max_new_tokens, description="Longest reasoning, in tokens."
    )


Steps = Annotated[
    int,
    Field(ge=1, le=LIMITS.max_steps, description="Denoising steps: more is slower and usually more detailed."),
]
Seed = Annotated[
    int | None,
    Field(
        ge=0,
        le=LIMITS.max_seed,
        description="Random seed for a reproducible result; omit for a random one (reported back).",
    ),
]
NumImages = Annotated[int, Field(ge=1, le=LIMITS.max_output_images, description="How many variants to make.")]
GuidanceScale = Annotated[
    float | None,
    Field(
        ge=0.0,
        le=LIMITS.max_guidance_scale,
        description=(
            "How closely to follow the text; omit for the model default "
            f"({_PLAIN_GUIDANCE[0]}, {_REASONED_GUIDANCE[0]} with reasoning)."
        ),
    ),
]
Side = Annotated[int | None, Field(ge=LIMITS.min_side, le=LIMITS.max_side)]
ReasoningId = Annotated[
    str | None,
    Field(
        max_length=64,
        description="A reasoning_id returned by reason for this same request, to follow that plan.",
    ),
]


class LoraChoice(BaseModel):
    """One LoRA adapter for an image job, named from the operator's list."""

    name: str = Field(min_length=1, max_length=64, description="An adapter name from the list in the tool description.")
    scale: float = Field(default=1.0, ge=-2.0, le=2.0, description="How strongly it acts: 1 as trained, 0 not at all.")


Loras = Annotated[
    list[LoraChoice] | None,
    Field(default=None, max_length=8,
          description="LoRA adapters to apply (styles, subjects), by name; only the ones the tool description lists."),
]


class GenerateImageInput(BaseModel):
    """Arguments of `generate_image`."""

    prompt: str = Field(
        min_length=1,
        max_length=LIMITS.max_prompt_chars,
        description="Description of the image to create (the same prompt given to reason, if used).",
    )
    width: Side = Field(default=None, description="Width in pixels (multiples of 16 work best); omit for the model default.")
    height: Side = Field(
        default=None, description="Height in pixels (multiples of 16 work best); omit for the model default."
    )
    steps: Steps = DEFAULT_STEPS
    seed: Seed = None
    num_images: NumImages = 1
    guidance_scale: GuidanceScale = None
    reasoning_id: ReasoningId = None
    loras: Loras = None


class EditImageInput(_AcceptsSingleImage):
    """Arguments of `edit_image`."""

    images: list[ImageRef] = Field(
        min_length=1,
        max_length=LIMITS.max_images_per_prompt,
        description="The image(s) to edit, as image_ids or file paths; the first one sets the default size.",
    )
    instruction: str = Field(
        min_length=1,
        max_length=LIMITS.max_prompt_chars,
        description="What to change, e.g. 'Make the sky purple and add a moon.'",
    )
    width: Side = Field(default=None, description="Output width in pixels; omit to keep the first image's width.")
    height: Side = Field(default=None, description="Output height in pixels; omit to keep the first image's height.")
    steps: Steps = DEFAULT_STEPS
    seed: Seed = None
    num_images: NumImages = 1
    guidance_scale: GuidanceScale = None
    image_guidance_scale: float | None = Field(
        default=None,
        ge=0.0,
        le=LIMITS.max_guidance_scale,
        description=(
            "How closely to keep the input image(s); omit for the model default "
            f"({_PLAIN_GUIDANCE[1]}, {_REASONED_GUIDANCE[1]} with reasoning)."
        ),
    )
    reasoning_id: ReasoningId = None
    loras: Loras = None
