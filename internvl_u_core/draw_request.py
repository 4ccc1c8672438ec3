"""One draw request: the options of ``generate``/``edit``, stated once.

The HTTP server parses a client's fields into a :class:`DrawRequest`, its engine batches requests by
:attr:`DrawRequest.batch_key`, :class:`~internvl_u_core.remote.RemoteInternVLU` sends one as the
images API's fields (:meth:`DrawRequest.wire_fields`), and the MCP server builds one per tool call;
all of them run it with :meth:`DrawRequest.run`. ``None`` means "the model's default" throughout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import validation as check
from .limits import DEFAULT_STEPS, Limits

if TYPE_CHECKING:
    from PIL import Image

    from .pipeline import Reasoning

#: The diffusion settings, as ``generate``/``edit`` name them (images drawn together share them all).
DIFFUSION_SETTINGS = ("width", "height", "steps", "all_cfg_scale", "part_cfg_scale", "timestep_trunc", "flow_shift")


@dataclass(frozen=True)
class DrawRequest:
    """``generate(prompt, …)`` without ``images``, ``edit(images, prompt, …)`` with them."""

    prompt: str
    images: tuple[Image.Image, ...] = ()
    seed: int | None = None
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULT_STEPS
    all_cfg_scale: float | None = None
    part_cfg_scale: float | None = None
    timestep_trunc: float | None = None
    flow_shift: float | None = None
    system_prompt: str | None = None
    reasoning: Reasoning | None = None

    @property
    def edits(self) -> bool:
        return bool(self.images)

    def settings(self) -> dict[str, Any]:
        """The diffusion settings as keyword arguments."""
        return {name: getattr(self, name) for name in DIFFUSION_SETTINGS}

    def options(self) -> dict[str, Any]:
        """Every keyword argument of ``generate``/``edit`` this request sets (all but the prompt and images)."""
        return {"seed": self.seed, "num_images": self.num_images, "system_prompt": self.system_prompt,
                "reasoning": self.reasoning, **self.settings()}

    def run(self, model, **extra: Any) -> list[Image.Image]:
        """Draw on ``model`` (a pipeline or anything with its ``generate``/``edit``); ``extra``: e.g. ``callback``."""
        options = {**self.options(), **extra}
        if self.images:
            return model.edit(list(self.images), self.prompt, **options)
        return model.generate(self.prompt, **options)

    def checked(self, limits: Limits) -> DrawRequest:
        """The same request with every option validated against ``limits`` (what a client can check locally)."""
        from .pipeline import check_reasoning

        check_reasoning(self.reasoning, len(self.images))
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                check.integer(getattr(self, name), name, limits.min_side, limits.max_side)
        scale = lambda value, name: None if value is None else check.guidance_scale(value, name, limits)  # noqa: E731
        return dataclasses.replace(
            self,
            prompt=check.text(self.prompt, "prompt", limits),
            seed=check.optional_seed(self.seed, limits),
            num_images=check.num_images(self.num_images, limits),
            steps=check.steps(self.steps, limits),
            all_cfg_scale=scale(self.all_cfg_scale, "all_cfg_scale"),
            part_cfg_scale=scale(self.part_cfg_scale, "part_cfg_scale"),
            timestep_trunc=None if self.timestep_trunc is None else check.timestep_trunc(self.timestep_trunc, limits),
            flow_shift=None if self.flow_shift is None else check.flow_shift(self.flow_shift, limits),
            system_prompt=check.system_prompt(self.system_prompt, limits),
        )

    def wire_fields(self) -> dict[str, Any]:
        """The images API's JSON (or form) fields for this request, the images themselves excepted.

        Both sides go as OpenAI's ``size``; one side alone in the ``width``/``height`` extension fields
        (the server then uses it for both, as in-process).
        """
        size = f"{self.width}x{self.height}" if self.width is not None and self.height is not None else None
        fields = {
            "prompt": self.prompt, "n": self.num_images, "size": size,
            "width": self.width if size is None else None, "height": self.height if size is None else None,
            "num_inference_steps": self.steps, "seed": self.seed,
            "all_cfg_scale": self.all_cfg_scale, "part_cfg_scale": self.part_cfg_scale,
            "timestep_trunc": self.timestep_trunc, "flow_shift": self.flow_shift,
            "system_prompt": self.system_prompt,
            "reasoning": None if self.reasoning is None else self.reasoning.to_dict(),
        }
        return {name: value for name, value in fields.items() if value is not None}

    @property
    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one denoising pass; ``None``: this one runs alone.

        One image each, the same kind (edit or not, with a reasoning or not), the same output size
        (a missing side defaults to the first input image's) and the same settings and system prompt.
        """
        if self.num_images != 1:
            return None
        width, height = self.width, self.height
        if self.images:
            width = self.images[0].width if width is None else width
            height = self.images[0].height if height is None else height
        settings = tuple((name, getattr(self, name)) for name in DIFFUSION_SETTINGS[2:])
        return self.edits, self.reasoning is not None, width, height, self.system_prompt, settings
