"""The four InternVL-U tools: understand, reason, generate and edit images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.tools import ToolException
from PIL import Image
from pydantic import BaseModel

from agent_tools.base import InternVLUTool, ToolOutput
from agent_tools.content import tool_content, truncate
from agent_tools.images import LoadedImage
from agent_tools.progress import JobControl
from agent_tools.reasonings import StoredReasoning
from agent_tools.schemas import (
    EditImageInput,
    GenerateImageInput,
    ReasonInput,
    UnderstandImageInput,
)
from agent_tools.session import lora_choices, loras_on
from internvl_u_core import InternVLUPipeline, random_seed


def _prepare_text_job(tool: InternVLUTool, request: UnderstandImageInput | ReasonInput) -> _ImageQuestion:
    """Shared by the two text tools: bound the answer length and load the referenced images."""
    tool._check_at_most("max_new_tokens", request.max_new_tokens, tool.session.limits.max_new_tokens)
    return _ImageQuestion(request, [tool.session.images.load(ref) for ref in request.images])


class UnderstandImageTool(InternVLUTool):
    """Answers a question about one or more images."""

    name: str = "understand_image"
    description: str = (
        "Look at one or more images with the InternVL-U vision-language model and answer a "
        "question about them (describe, count, read text, compare). Images are image_ids "
        "from earlier results or file paths inside the allowed folders. Returns the answer."
    )
    args_schema: type[BaseModel] = UnderstandImageInput

    def _prepare(self, request: UnderstandImageInput) -> _ImageQuestion:
        return _prepare_text_job(self, request)

    def _call_core(self, pipeline: InternVLUPipeline, control: JobControl, plan: _ImageQuestion) -> str:
        return pipeline.understand(
            [loaded.image for loaded in plan.images],
            plan.request.question,
            max_new_tokens=plan.request.max_new_tokens,
            token_callback=lambda done, total: control.progress("answering", done, total),
        )

    def _present(self, plan: _ImageQuestion, answer: str) -> ToolOutput:
        names = ", ".join(loaded.source.name for loaded in plan.images)
        artifact = {
            "tool": self.name,
            "answer": answer,
            "question": plan.request.question,
            "input_images": [loaded.describe() for loaded in plan.images],
        }
        return f"Answer about {names}: {answer}", artifact


class ReasonTool(InternVLUTool):
    """Thinks through an image request; the reasoning can steer generate/edit."""

    name: str = "reason"
    description: str = (
        "Think step by step with InternVL-U about an image to create, or about an edit to "
        "make to given images, before calling generate_image or edit_image. Use it for "
        "requests that need knowledge or planning. Returns the reasoning and a reasoning_id; "
        "pass that reasoning_id, with the same prompt (and images), to generate_image or "
        "edit_image so the picture follows the plan."
    )
    args_schema: type[BaseModel] = ReasonInput

    def _prepare(self, request: ReasonInput) -> _ImageQuestion:
        return _prepare_text_job(self, request)

    def _call_core(self, pipeline: InternVLUPipeline, control: JobControl, plan: _ImageQuestion) -> Any:
        return pipeline.reason(
            plan.request.prompt,
            images=[loaded.image for loaded in plan.images] or None,
            max_new_tokens=plan.request.max_new_tokens,
            token_callback=lambda done, total: control.progress("reasoning", done, total),
        )

    def _present(self, plan: _ImageQuestion, reasoning: Any) -> ToolOutput:
        inputs = tuple(loaded.describe() for loaded in plan.images)
        stored = self.session.reasonings.add(reasoning, inputs)
        if plan.images:
            purpose = "edit_image with this prompt as instruction, the images " + ", ".join(loaded.source.name for loaded in plan.images)
        else:
            purpose = "generate_image with the same prompt"
        shown = truncate(reasoning.text, self.session.limits.max_reasoning_chars)
        text = (
            f"Reasoning {stored.reasoning_id}: {shown}\n"
            f"To follow it, call {purpose} and reasoning_id='{stored.reasoning_id}'."
        )
        artifact = {
            "tool": self.name,
            "reasoning_id": stored.reasoning_id,
            "text": reasoning.text,
            "num_tokens": len(reasoning.token_ids),
            "prompt": plan.request.prompt,
            "input_images": list(inputs),
        }
        return text, artifact


class _ImageOutputTool(InternVLUTool):
    """Shared by generate_image and edit_image: output limits, reasoning, saving."""

    def _check_output_limits(self, request: Any) -> None:
        limits = self.session.limits
        self._check_at_most("width", request.width, limits.max_output_side)
        self._check_at_most("height", request.height, limits.max_output_side)
        self._check_at_most("steps", request.steps, limits.max_steps)
        self._check_at_most("num_images", request.num_images, limits.max_output_images)

    def _reasoning(self, reasoning_id: str | None, expected_images: int) -> StoredReasoning | None:
        if reasoning_id is None:
            return None
        stored = self.session.reasonings.get(reasoning_id)
        made_for = stored.reasoning.num_images
        if made_for != expected_images:
            raise ToolException(
                f"Reasoning {reasoning_id} was made for {made_for} input image(s), but "
                f"{self.name} got {expected_images}. Call reason with the same images "
                f"({'none' if expected_images == 0 else 'the ones to edit'}) first."
            )
        return stored

    def _describe_outputs(self, plan: _ImageJob, images: list[Image.Image], headline: str) -> ToolOutput:
        saved = [self.session.images.save(image) for image in images]
        request = plan.request
        details = f"seed {plan.seed}, {request.steps} steps"
        if plan.reasoning:
            details += f", following {plan.reasoning.reasoning_id}"
        lines = [f"{headline} ({details}):", *(f"- {item.label()}" for item in saved)]
        lines.append("Refer to an image by its image_id in later calls.")
        content = tool_content(
            "\n".join(lines),
            list(zip(saved, images, strict=True)),
            return_images=self.session.return_images,
            thumbnail_size=self.session.thumbnail_size,
        )
        artifact = {
            "tool": self.name,
            "images": [item.describe() for item in saved],
            "input_images": [loaded.describe() for loaded in plan.images],
            "seed": plan.seed,
            "reasoning_id": plan.reasoning.reasoning_id if plan.reasoning else None,
            "request": request.model_dump(exclude={"images"}),
        }
        return content, artifact


class GenerateImageTool(_ImageOutputTool):
    """Creates images from a text prompt and saves them as PNG files."""

    name: str = "generate_image"
    description: str = (
        "Create new image(s) from a text description with InternVL-U. Each image is saved "
        "as a PNG file; the result gives its image_id, path, size and the seed used (you do "
        "not see the picture unless previews are enabled). Pass the image_id to edit_image "
        "or understand_image to work with it."
    )
    args_schema: type[BaseModel] = GenerateImageInput

    def _prepare(self, request: GenerateImageInput) -> _ImageJob:
        self._check_output_limits(request)
        reasoning = self._reasoning(request.reasoning_id, expected_images=0)
        return _ImageJob(request, [], reasoning, _seed(request.seed), lora_choices(self.session, request.loras))

    def _call_core(self, pipeline: InternVLUPipeline, control: JobControl, plan: _ImageJob) -> list[Image.Image]:
        request = plan.request
        with loras_on(pipeline, plan.loras):
            return pipeline.generate(
                request.prompt,
                width=request.width,
                height=request.height,
                steps=request.steps,
                all_cfg_scale=request.guidance_scale,
                seed=plan.seed,
                num_images=request.num_images,
                reasoning=plan.reasoning.reasoning if plan.reasoning else None,
                callback=lambda step, total, _latents: control.progress("denoising", step, total),
            )

    def _present(self, plan: _ImageJob, images: list[Image.Image]) -> ToolOutput:
        return self._describe_outputs(plan, images, f"Generated {_count(images)}")


class EditImageTool(_ImageOutputTool):
    """Edits images following an instruction and saves the results as new PNG files."""

    name: str = "edit_image"
    description: str = (
        "Change existing image(s) following an instruction with InternVL-U (add or remove "
        "things, change colours, style or background). Inputs are image_ids from earlier "
        "results or file paths inside the allowed folders; they are not modified. Each "
        "result is saved as a new PNG with a new image_id, reported with its path, size "
        "and seed."
    )
    args_schema: type[BaseModel] = EditImageInput

    def _prepare(self, request: EditImageInput) -> _ImageJob:
        self._check_output_limits(request)
        reasoning = self._reasoning(request.reasoning_id, expected_images=len(request.images))
        images = [self.session.images.load(ref) for ref in request.images]
        return _ImageJob(request, images, reasoning, _seed(request.seed), lora_choices(self.session, request.loras))

    def _call_core(self, pipeline: InternVLUPipeline, control: JobControl, plan: _ImageJob) -> list[Image.Image]:
        request = plan.request
        with loras_on(pipeline, plan.loras):
            return pipeline.edit(
                [loaded.image for loaded in plan.images],
                request.instruction,
                width=request.width,
                height=request.height,
                steps=request.steps,
                all_cfg_scale=request.guidance_scale,
                part_cfg_scale=request.image_guidance_scale,
                seed=plan.seed,
                num_images=request.num_images,
                reasoning=plan.reasoning.reasoning if plan.reasoning else None,
                callback=lambda step, total, _latents: control.progress("denoising", step, total),
            )

    def _present(self, plan: _ImageJob, images: list[Image.Image]) -> ToolOutput:
        sources = ", ".join(loaded.source.name for loaded in plan.images)
        return self._describe_outputs(plan, images, f"Edited {sources} into {_count(images)}")


@dataclass(frozen=True)
class _ImageQuestion:
    request: Any
    images: list[LoadedImage]


@dataclass(frozen=True)
class _ImageJob:
    request: Any
    images: list[LoadedImage]
    reasoning: StoredReasoning | None
    seed: int
    loras: list[tuple[Path, float]] = field(default_factory=list)  # adapter files and scales for this job


def _seed(requested: int | None) -> int:
    return requested if requested is not None else random_seed()


def _count(images: list[Image.Image]) -> str:
    return "1 image" if len(images) == 1 else f"{len(images)} images"
