"""State the four tools share: one pipeline runner, the image files, the reasonings."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from agent_tools.images import ImageStore
from agent_tools.reasonings import ReasoningStore
from agent_tools.runner import PipelineRunner
from internvl_u_core import DEFAULT_LIMITS, InternVLUPipeline, InvalidInputError, RemoteInternVLU, lora
from internvl_u_core.remote import is_server_url

ReturnImages = Literal["none", "thumbnail", "full"]


def _at_most(policy: int, core_bound: str) -> Any:
    """A tighter default for agents that never exceeds the core's bound of the same kind (named in the
    field's metadata, which `ToolLimits.__post_init__` checks any given value against)."""
    return field(
        default_factory=lambda: min(policy, getattr(DEFAULT_LIMITS, core_bound)), metadata={"core_bound": core_bound}
    )


@dataclass(frozen=True)
class ToolLimits:
    """Bounds for agents, tighter than the core's ``DEFAULT_LIMITS`` (which also cap any value given here)."""

    max_input_bytes: int = 20 * 2**20
    max_input_pixels: int = _at_most(25_000_000, "max_input_file_pixels")
    max_output_side: int = _at_most(2048, "max_side")
    max_output_images: int = _at_most(4, "max_output_images")
    max_steps: int = _at_most(100, "max_steps")
    max_new_tokens: int = _at_most(2048, "max_new_tokens")
    max_reasoning_chars: int = 4000
    """Longer reasoning is cut in the text the agent reads; the artifact keeps it whole."""

    def __post_init__(self) -> None:
        for policy in fields(self):
            core_bound = policy.metadata.get("core_bound")
            if core_bound is None:
                continue
            value, ceiling = getattr(self, policy.name), getattr(DEFAULT_LIMITS, core_bound)
            if not 1 <= value <= ceiling:
                msg = f"ToolLimits.{policy.name} = {value} must be between 1 and the core's {core_bound} ({ceiling})"
                raise ValueError(msg)


def check_lora_list(loras: Mapping[str, str | os.PathLike[str]], served: bool) -> dict[str, Path]:
    """The operator's adapters (name -> .safetensors file) the agent may name (checked by the core)."""
    if loras and served:
        raise ValueError("loras apply to a model loaded here; a served model's adapters are set up on its server")
    try:
        return lora.named_adapters(loras)
    except InvalidInputError as error:
        raise ValueError(str(error)) from error


def lora_choices(session: InternVLUSession, choices) -> list[tuple[Path, float]]:
    """The agent's ``loras`` argument → files and scales; names outside the operator's list are refused."""
    from langchain_core.tools import ToolException

    try:
        return lora.pick_named(session.loras, [(choice.name, choice.scale) for choice in choices or []])
    except InvalidInputError as error:
        raise ToolException(f"{error}.") from error


def loras_on(pipeline: Any, picked: list[tuple[Path, float]]):
    """The picked adapters on for one job; the next job starts from the adapters on before."""
    return lora.adapters_on(pipeline, picked)


class InternVLUSession:
    """One model, one output folder, one set of ids: what a toolkit's tools share.

    Args:
        model: a loaded `InternVLUPipeline`, a checkpoint path / hub id loaded on first use, or the
            URL of an `internvl-u serve` server (`http(s)://host:port`, used through `RemoteInternVLU`).
        output_dir: where generated and edited images are written as `<image_id>.png`.
        allowed_dirs: folders (besides `output_dir`) whose image files the agent may read.
        load_kwargs: extra arguments for `InternVLUPipeline.from_pretrained`.
        limits: input, output and run-length bounds.
        return_images: also show new images to the agent's model as image content blocks:
            `"none"` (text only), `"thumbnail"` or `"full"`.
        thumbnail_size: longest side of thumbnails, in pixels.
        api_key: the server's key when `model` is a URL (None: `$INTERNVL_U_API_KEY` if set).
        timeout: seconds one job may take on the server when `model` is a URL.
    """

    def __init__(
        self,
        model: InternVLUPipeline | RemoteInternVLU | str | os.PathLike[str],
        output_dir: str | os.PathLike[str],
        allowed_dirs: Sequence[str | os.PathLike[str]] = (),
        *,
        load_kwargs: dict[str, Any] | None = None,
        limits: ToolLimits | None = None,
        return_images: ReturnImages = "none",
        thumbnail_size: int = 256,
        api_key: str | None = None,
        timeout: float = 600.0,
        loras: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> None:
        self.limits = limits or ToolLimits()
        self.loras = check_lora_list(loras or {}, served=is_server_url(model))
        if is_server_url(model):
            if load_kwargs:
                msg = f"load_kwargs apply to a model loaded here; the served model at {model} is set up on its server"
                raise ValueError(msg)
            model = RemoteInternVLU(model, api_key=api_key, timeout=timeout)
        elif api_key is not None:
            raise ValueError("api_key is for a served model: pass model='http(s)://host:port' with it")
        self.runner = PipelineRunner(model, load_kwargs)
        self.images = ImageStore(
            output_dir,
            allowed_dirs,
            max_input_bytes=self.limits.max_input_bytes,
            max_input_pixels=self.limits.max_input_pixels,
        )
        self.reasonings = ReasoningStore()
        if return_images not in ("none", "thumbnail", "full"):
            msg = f"return_images must be 'none', 'thumbnail' or 'full', got {return_images!r}"
            raise ValueError(msg)
        self.return_images: ReturnImages = return_images
        self.thumbnail_size = thumbnail_size

    def load(self) -> InternVLUPipeline | RemoteInternVLU:
        """Load the model now instead of on the first tool call."""
        return self.runner.load()

    def add_image(self, source: Any) -> str:
        """Register an application-supplied image (PIL image or path); return its image_id."""
        stored = self.images.add(source)
        assert stored.image_id is not None
        return stored.image_id
