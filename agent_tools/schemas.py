"""Argument schemas the agent's model sees (pydantic v2)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator

MAX_SIDE = 2048
MAX_STEPS = 100
MAX_SEED = 2**32 - 1

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
        max_length=8,
        description="The image(s) to look at, as image_ids or file paths.",
    )
    question: str = Field(
        min_length=1,
        max_length=4000,
        description="What to ask, e.g. 'Describe this picture.' or 'How many apples are there?'",
    )
    max_new_tokens: int = Field(default=256, ge=1, le=2048, description="Longest answer, in tokens.")


class ReasonInput(_AcceptsSingleImage):
    """Arguments of `reason`."""

    prompt: str = Field(
        min_length=1,
        max_length=4000,
        description=(
            "The image request to think through: a description of an image to create, "
            "or an edit instruction when `images` are given."
        ),
    )
    images: list[ImageRef] = Field(
        default_factory=list,
        max_length=4,
        description=(
            "Leave empty to plan a new image. To plan an edit, the image(s) that "
            "edit_image will get, in the same order."
        ),
    )
    max_new_tokens: int = Field(default=200, ge=1, le=2048, description="Longest reasoning, in tokens.")


Steps = Annotated[
    int,
    Field(ge=1, le=MAX_STEPS, description="Denoising steps: more is slower and usually more detailed."),
]
Seed = Annotated[
    int | None,
    Field(
        ge=0,
        le=MAX_SEED,
        description="Random seed for a reproducible result; omit for a random one (reported back).",
    ),
]
NumImages = Annotated[int, Field(ge=1, le=4, description="How many variants to make.")]
GuidanceScale = Annotated[
    float | None,
    Field(
        ge=0.0,
        le=20.0,
        description=("How closely to follow the text; omit for the model default (4.5, 3.5 with reasoning)."),
    ),
]
ReasoningId = Annotated[
    str | None,
    Field(
        max_length=64,
        description="A reasoning_id returned by reason for this same request, to follow that plan.",
    ),
]


class GenerateImageInput(BaseModel):
    """Arguments of `generate_image`."""

    prompt: str = Field(
        min_length=1,
        max_length=4000,
        description="Description of the image to create (the same prompt given to reason, if used).",
    )
    width: int | None = Field(
        default=None,
        ge=16,
        le=MAX_SIDE,
        description="Width in pixels (multiples of 16 work best); omit for the model default.",
    )
    height: int | None = Field(
        default=None,
        ge=16,
        le=MAX_SIDE,
        description="Height in pixels (multiples of 16 work best); omit for the model default.",
    )
    steps: Steps = 20
    seed: Seed = None
    num_images: NumImages = 1
    guidance_scale: GuidanceScale = None
    reasoning_id: ReasoningId = None


class EditImageInput(_AcceptsSingleImage):
    """Arguments of `edit_image`."""

    images: list[ImageRef] = Field(
        min_length=1,
        max_length=4,
        description="The image(s) to edit, as image_ids or file paths; the first one sets the default size.",
    )
    instruction: str = Field(
        min_length=1,
        max_length=4000,
        description="What to change, e.g. 'Make the sky purple and add a moon.'",
    )
    width: int | None = Field(
        default=None,
        ge=16,
        le=MAX_SIDE,
        description="Output width in pixels; omit to keep the first image's width.",
    )
    height: int | None = Field(
        default=None,
        ge=16,
        le=MAX_SIDE,
        description="Output height in pixels; omit to keep the first image's height.",
    )
    steps: Steps = 20
    seed: Seed = None
    num_images: NumImages = 1
    guidance_scale: GuidanceScale = None
    image_guidance_scale: float | None = Field(
        default=None,
        ge=0.0,
        le=20.0,
        description="How closely to keep the input image(s); omit for the model default (2.0, 1.5 with reasoning).",
    )
    reasoning_id: ReasoningId = None
