"""The InternVL-U MCP server: understand, reason, generate and edit as MCP tools.

```python
from internvl_u_core import InternVLUPipeline
from internvl_u_serve.mcp.server import build_server

pipe = InternVLUPipeline.from_pretrained("path/to/checkpoint")
build_server(pipe, output_dir="outputs", allowed_dirs=["inputs"]).run("stdio")
```

Images are named by the ids earlier results gave or by paths inside the allowed folders
(`internvl_u_core.files`); results are saved there as PNG files and also returned as MCP image
content. Argument bounds come from the model's `limits` (`internvl_u_core.validation.Limits`).
"""

# No `from __future__ import annotations`: the tool signatures below carry bounds computed at
# run time, and the SDK reads them as live objects to build each tool's input schema.

import base64
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Protocol

import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from internvl_u_core import InvalidInputError, InvalidInputTypeError, Limits, Reasoning, __version__, lora, random_seed
from internvl_u_core.draw_request import DrawRequest
from internvl_u_core.files import ImageStore, LoadedImage, StoredImage
from internvl_u_core.limits import DEFAULT_GUIDANCE, DEFAULT_STEPS
from internvl_u_core.reasonings import ReasoningStore, StoredReasoning
from internvl_u_core.validation import shown
from internvl_u_serve.mcp.jobs import JobRunner, StepReporter


class InternVLUModel(Protocol):
    """What the server needs from a model: `InternVLUPipeline`'s friendly methods and limits."""

    limits: Limits

    def understand(self, images: Any, question: str, **kwargs: Any) -> str: ...

    def reason(self, prompt: str, images: Any = None, **kwargs: Any) -> Reasoning: ...

    def generate(self, prompt: str, **kwargs: Any) -> list[Image.Image]: ...

    def edit(self, images: Any, instruction: str, **kwargs: Any) -> list[Image.Image]: ...


# ------------------------------------------------------------------------------------------------
# Structured results (each tool's outputSchema); the text content says the same for a model.
# ------------------------------------------------------------------------------------------------
class ImageInfo(BaseModel):
    """An image file: its id (for images this server wrote), path and size."""

    image_id: str | None
    path: str
    width: int
    height: int


class Answer(BaseModel):
    """What `understand_image` returns."""

    answer: str
    input_images: list[ImageInfo]


class ReasoningResult(BaseModel):
    """What `reason` returns."""

    reasoning_id: str = Field(description="Pass it to generate_image or edit_image to follow this reasoning.")
    text: str
    num_tokens: int


class ImagesResult(BaseModel):
    """What `generate_image` and `edit_image` return (the pictures also come as image content)."""

    images: list[ImageInfo]
    seed: int = Field(description="The seed used; pass it again to reproduce the result.")
    reasoning_id: str | None
    input_images: list[ImageInfo]


READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
WRITES_NEW_FILES = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
)


def build_server(
    model: InternVLUModel,
    output_dir: str | os.PathLike[str],
    allowed_dirs: Sequence[str | os.PathLike[str]] = (),
    loras: Mapping[str, str | os.PathLike[str]] | None = None,
) -> MCPServer:
    """An MCP server offering understand_image, reason, generate_image and edit_image over `model`.

    Args:
        model: a loaded `InternVLUPipeline`, or anything with its friendly methods and `limits`.
        output_dir: where generated and edited images are written as `<image_id>.png`.
        allowed_dirs: folders, besides `output_dir`, whose image files the client may name.
        loras: LoRA adapters clients may name in generate_image/edit_image, `{name: file.safetensors}`
            (a model loaded here only; clients see the names, never give paths).
    """
    if loras and not hasattr(model, "loras"):
        raise InvalidInputError("loras apply to a model loaded here; a served model's adapters are set up on its server")
    images = ImageStore(output_dir, allowed_dirs, max_input_pixels=model.limits.max_input_pixels)
    tools = InternVLUTools(model, images, ReasoningStore(), JobRunner(), lora.named_adapters(loras or {}))
    readable = ", ".join(str(folder) for folder in [*images.allowed_dirs, images.output_dir])
    server = _InternVLUServer(
        "internvl-u",
        title="InternVL-U",
        version=__version__,
        instructions=(
            "InternVL-U answers questions about images, thinks through image requests, and "
            "generates and edits images. Name input images by the image_id an earlier result "
            f"gave, or by a file path inside these folders: {readable}. New images are saved "
            f"as PNG files in {images.output_dir}."
        ),
    )
    _add_tools(server, tools, model.limits)
    return server


class LoraPick(BaseModel):
    """One adapter from the server's list, and how strongly it acts."""

    name: str = Field(min_length=1, max_length=64, description="An adapter name from the list in the description.")
    scale: float = Field(default=1.0, ge=-2.0, le=2.0, description="1 as trained, 0 not at all.")


class InternVLUTools:
    """The four tools' work: resolve references, run the model one job at a time, present results."""

    def __init__(self, model: InternVLUModel, images: ImageStore, reasonings: ReasoningStore, runner: JobRunner,
                 loras: dict | None = None):
        self.model = model
        self.images = images
        self.reasonings = reasonings
        self.runner = runner
        self.loras = loras or {}  # name -> adapter file, the operator's list

    async def understand(
        self, ctx: Context, refs: list[str], question: str, max_new_tokens: int | None
    ) -> CallToolResult:
        with _refusals_as_tool_errors():
            loaded = await self._load(refs)

            def job(step: StepReporter) -> str:
                return self.model.understand(
                    [item.image for item in loaded],
                    question,
                    token_callback=lambda done, total: step("answering", done, total),
                    **_given(max_new_tokens=max_new_tokens),
                )

            answer = await self.runner.run(job, ctx.report_progress)
        result = Answer(answer=answer, input_images=[_info(item.source) for item in loaded])
        names = ", ".join(item.source.name for item in loaded)
        return _result([TextContent(type="text", text=f"Answer about {names}: {answer}")], result)

    async def reason(self, ctx: Context, prompt: str, refs: list[str], max_new_tokens: int | None) -> CallToolResult:
        with _refusals_as_tool_errors():
            loaded = await self._load(refs)

            def job(step: StepReporter) -> Reasoning:
                return self.model.reason(
                    prompt,
                    [item.image for item in loaded] or None,
                    token_callback=lambda done, total: step("reasoning", done, total),
                    **_given(max_new_tokens=max_new_tokens),
                )

            reasoning = await self.runner.run(job, ctx.report_progress)
        stored = self.reasonings.add(reasoning, tuple(item.describe() for item in loaded))
        if loaded:
            follow = "edit_image with this prompt as instruction, the images " + ", ".join(
                item.source.name for item in loaded
            )
        else:
            follow = "generate_image with the same prompt"
        text = (
            f"Reasoning {stored.reasoning_id}: {reasoning.text}\n"
            f"To follow it, call {follow} and reasoning_id='{stored.reasoning_id}'."
        )
        result = ReasoningResult(
            reasoning_id=stored.reasoning_id, text=reasoning.text, num_tokens=len(reasoning.token_ids)
        )
        return _result([TextContent(type="text", text=text)], result)

    async def generate(self, ctx: Context, prompt: str, seed: int | None, reasoning_id: str | None,
                       loras: list[LoraPick] | None = None, **settings: Any) -> CallToolResult:
        return await self._draw(ctx, prompt, [], seed, reasoning_id, settings, loras)

    async def edit(self, ctx: Context, refs: list[str], instruction: str, seed: int | None,
                   reasoning_id: str | None, loras: list[LoraPick] | None = None, **settings: Any) -> CallToolResult:
        return await self._draw(ctx, instruction, refs, seed, reasoning_id, settings, loras)

    async def _draw(
        self,
        ctx: Context,
        prompt: str,
        refs: list[str],
        seed: int | None,
        reasoning_id: str | None,
        settings: dict[str, Any],
        loras: list[LoraPick] | None = None,
    ) -> CallToolResult:
        """Shared by generate and edit: resolve inputs, draw the request on the model, save and present."""
        with _refusals_as_tool_errors():
            stored = None if reasoning_id is None else self.reasonings.get(reasoning_id)
            chosen = lora.pick_named(self.loras, [(pick.name, pick.scale) for pick in loras or []])
            loaded = await self._load(refs)
            request = DrawRequest(
                prompt, tuple(item.image for item in loaded), seed=_seed(seed),
                reasoning=stored.reasoning if stored else None, **_given(**settings),
            )

            def job(step: StepReporter) -> list[Image.Image]:
                with lora.adapters_on(self.model, chosen):
                    return request.run(self.model,
                                       callback=lambda done, total, _latents: step("denoising", done, total))

            pictures = await self.runner.run(job, ctx.report_progress)
        if loaded:
            headline = f"Edited {', '.join(item.source.name for item in loaded)} into {_count(pictures)}"
        else:
            headline = f"Generated {_count(pictures)}"
        return await self._present(headline, pictures, loaded, request.seed, stored)

    async def _load(self, refs: list[str]) -> list[LoadedImage]:
        """Decode the referenced images in a worker thread, outside the model's queue."""
        return [await anyio.to_thread.run_sync(self.images.load, ref) for ref in refs]

    async def _present(
        self,
        headline: str,
        pictures: list[Image.Image],
        loaded: list[LoadedImage],
        seed: int,
        reasoning: StoredReasoning | None,
    ) -> CallToolResult:
        """Save the pictures; return them as PNG image content with their paths and ids as text."""
        saved = await anyio.to_thread.run_sync(lambda: [self.images.save(picture) for picture in pictures])
        details = f"seed {seed}" + (f", following {reasoning.reasoning_id}" if reasoning else "")
        lines = [f"{headline} ({details}):", *(f"- {item.label()}" for item in saved)]
        lines.append("Refer to an image by its image_id in later calls.")
        content: list[ContentBlock] = [TextContent(type="text", text="\n".join(lines))]
        for item in saved:
            data = await anyio.to_thread.run_sync(item.path.read_bytes)
            content.append(ImageContent(type="image", data=base64.b64encode(data).decode("ascii"), mime_type="image/png"))
        result = ImagesResult(
            images=[_info(item) for item in saved],
            seed=seed,
            reasoning_id=reasoning.reasoning_id if reasoning else None,
            input_images=[_info(item.source) for item in loaded],
        )
        return _result(content, result)


class _Arguments:
    """The tools' argument types, their bounds taken from the model's `limits` (shown in each input schema)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        image_ref = Annotated[
            str,
            Field(
                min_length=1,
                description=(
                    "An image_id from an earlier result (like 'img_3f9a1c0b7e2d') or the path of an "
                    "image file inside the allowed folders."
                ),
            ),
        ]
        self.image_list = list[image_ref]
        self.steps = Annotated[
            int | None,
            Field(
                ge=1,
                le=limits.max_steps,
                description=f"Denoising steps (default {DEFAULT_STEPS}): more is slower and usually more detailed.",
            ),
        ]
        self.seed = Annotated[
            int | None,
            Field(ge=0, le=limits.max_seed, description="Random seed for a reproducible result; omit for a random one "
                                                        "(reported)."),
        ]
        self.num_images = Annotated[
            int | None,
            Field(ge=1, le=limits.max_output_images, description="How many variants to make (default 1)."),
        ]
        self.guidance = self.guidance_scale("follow the text", 0)
        self.image_guidance = self.guidance_scale("keep the input image(s)", 1)
        self.reasoning_id = Annotated[
            str | None,
            Field(description="A reasoning_id returned by reason for this same request, to follow that plan."),
        ]
        self.size_note = f"width x height may be at most {limits.max_pixels} pixels."

    def text(self, description: str) -> Any:
        return Annotated[str, Field(min_length=1, max_length=self.limits.max_prompt_chars, description=description)]

    def input_images(self, description: str) -> Any:
        return Annotated[
            self.image_list,
            Field(min_length=1, max_length=self.limits.max_images_per_prompt, description=description),
        ]

    def new_tokens(self, what: str) -> Any:
        return Annotated[
            int | None,
            Field(ge=1, le=self.limits.max_new_tokens, description=f"Longest {what}, in tokens; omit for the default."),
        ]

    def side(self, description: str) -> Any:
        return Annotated[int | None, Field(ge=self.limits.min_side, le=self.limits.max_side, description=description)]

    def guidance_scale(self, what: str, index: int) -> Any:
        """`all_cfg_scale` (index 0) or `part_cfg_scale` (1), described with the model's defaults."""
        plain, reasoned = DEFAULT_GUIDANCE["image"][index], DEFAULT_GUIDANCE["text_image"][index]
        return Annotated[
            float | None,
            Field(
                ge=0.0,
                le=self.limits.max_guidance_scale,
                allow_inf_nan=False,
                description=f"How closely to {what}; omit for the model default ({plain}, {reasoned} with reasoning).",
            ),
        ]


def _add_tools(server: MCPServer, tools: InternVLUTools, limits: Limits) -> None:
    """Register the four tools, their argument bounds taken from `limits`."""
    arguments = _Arguments(limits)
    offered = ", ".join(sorted(tools.loras)) or "none on this server"
    arguments.loras = Annotated[
        list[LoraPick] | None,
        Field(max_length=8, description=f"LoRA adapters (styles, subjects) to apply, by name: {offered}."),
    ]
    for add in (_add_understand_image, _add_reason, _add_generate_image, _add_edit_image):
        add(server, tools, arguments)


def _add_understand_image(server: MCPServer, tools: InternVLUTools, a: _Arguments) -> None:
    @server.tool(
        name="understand_image",
        title="Understand images",
        annotations=READ_ONLY,
        description=(
            "Look at one or more images with the InternVL-U vision-language model and answer a "
            "question about them (describe, count, read text, compare). Images are image_ids "
            "from earlier results or file paths inside the allowed folders. Returns the answer."
        ),
    )
    async def understand_image(
        images: a.input_images("The image(s) to look at, as image_ids or file paths."),
        question: a.text("What to ask, e.g. 'Describe this picture.' or 'How many apples are there?'"),
        ctx: Context,
        max_new_tokens: a.new_tokens("answer") = None,
    ) -> Annotated[CallToolResult, Answer]:
        return await tools.understand(ctx, images, question, max_new_tokens)


def _add_reason(server: MCPServer, tools: InternVLUTools, a: _Arguments) -> None:
    @server.tool(
        name="reason",
        title="Reason about an image request",
        annotations=READ_ONLY,
        description=(
            "Think step by step with InternVL-U about an image to create, or about an edit to "
            "make to given images, before calling generate_image or edit_image. Use it for "
            "requests that need knowledge or planning. Returns the reasoning and a reasoning_id; "
            "pass that reasoning_id, with the same prompt (and images), to generate_image or "
            "edit_image so the picture follows the plan."
        ),
    )
    async def reason(
        prompt: a.text(
            "The image request to think through: a description of an image to create, or an edit "
            "instruction when images are given."
        ),
        ctx: Context,
        images: a.input_images(
            "Omit to plan a new image. To plan an edit, the image(s) that edit_image will get, in the same order."
        )
        | None = None,
        max_new_tokens: a.new_tokens("reasoning") = None,
    ) -> Annotated[CallToolResult, ReasoningResult]:
        return await tools.reason(ctx, prompt, images or [], max_new_tokens)


def _add_generate_image(server: MCPServer, tools: InternVLUTools, a: _Arguments) -> None:
    @server.tool(
        name="generate_image",
        title="Generate images",
        annotations=WRITES_NEW_FILES,
        description=(
            "Create new image(s) from a text description with InternVL-U. Each image is saved as a "
            "new PNG file and returned as image content, with its image_id, path, size and the seed "
            "used. Pass the image_id to edit_image or understand_image to work with it."
        ),
    )
    async def generate_image(
        prompt: a.text("Description of the image to create (the same prompt given to reason, if used)."),
        ctx: Context,
        width: a.side(f"Width in pixels (multiples of 16 work best); omit for the model default. {a.size_note}") = None,
        height: a.side(
            f"Height in pixels (multiples of 16 work best); omit for the model default. {a.size_note}") = None,
        steps: a.steps = None,
        seed: a.seed = None,
        num_images: a.num_images = None,
        guidance_scale: a.guidance = None,
        reasoning_id: a.reasoning_id = None,
        loras: a.loras = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        return await tools.generate(
            ctx, prompt, seed, reasoning_id, loras,
            width=width, height=height, steps=steps, num_images=num_images, all_cfg_scale=guidance_scale,
        )


def _add_edit_image(server: MCPServer, tools: InternVLUTools, a: _Arguments) -> None:
    @server.tool(
        name="edit_image",
        title="Edit images",
        annotations=WRITES_NEW_FILES,
        description=(
            "Change existing image(s) following an instruction with InternVL-U (add or remove "
            "things, change colours, style or background). Inputs are image_ids from earlier "
            "results or file paths inside the allowed folders; they are not modified. Each result "
            "is saved as a new PNG file with a new image_id and returned as image content, with its "
            "path, size and seed."
        ),
    )
    async def edit_image(
        images: a.input_images("The image(s) to edit, as image_ids or file paths; the first sets the default size."),
        instruction: a.text("What to change, e.g. 'Make the sky purple and add a moon.'"),
        ctx: Context,
        width: a.side(f"Output width in pixels; omit to keep the first image's width. {a.size_note}") = None,
        height: a.side(f"Output height in pixels; omit to keep the first image's height. {a.size_note}") = None,
        steps: a.steps = None,
        seed: a.seed = None,
        num_images: a.num_images = None,
        guidance_scale: a.guidance = None,
        image_guidance_scale: a.image_guidance = None,
        reasoning_id: a.reasoning_id = None,
        loras: a.loras = None,
    ) -> Annotated[CallToolResult, ImagesResult]:
        return await tools.edit(
            ctx, images, instruction, seed, reasoning_id, loras,
            width=width, height=height, steps=steps, num_images=num_images,
            all_cfg_scale=guidance_scale, part_cfg_scale=image_guidance_scale,
        )


class _InternVLUServer(MCPServer):
    """The SDK's server, with argument errors in our words (the SDK's are pydantic's raw report, with a link)."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None):
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as error:
            if isinstance(error.__cause__, ValidationError):
                raise ToolError(f"{name}: {_argument_problems(error.__cause__)}") from error.__cause__
            raise


def _argument_problems(error: ValidationError) -> str:
    """Each refused argument as 'name = value: what is wrong' (pydantic's short message, without its link)."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "arguments"
        if item["type"] == "missing":
            problems.append(f"{where} is required")
        else:
            problems.append(f"{where} = {shown(item.get('input'))} is refused: {item['msg'].rstrip('.')}")
    return "; ".join(problems) + ". Fix the argument(s) and call again."


@contextmanager
def _refusals_as_tool_errors() -> Iterator[None]:
    """Bad references and arguments the core refuses reach the client as tool errors it can act on."""
    try:
        yield
    except (InvalidInputError, InvalidInputTypeError) as error:
        raise ToolError(str(error)) from error


def _result(content: list[ContentBlock], structured: BaseModel) -> CallToolResult:
    return CallToolResult(content=content, structured_content=structured.model_dump(mode="json"))


def _given(**arguments: Any) -> dict[str, Any]:
    """The arguments the client set: the model's own defaults apply to the rest."""
    return {name: value for name, value in arguments.items() if value is not None}


def _seed(requested: int | None) -> int:
    return requested if requested is not None else random_seed()


def _info(image: StoredImage) -> ImageInfo:
    return ImageInfo(**image.describe())


def _count(pictures: list[Image.Image]) -> str:
    return "1 image" if len(pictures) == 1 else f"{len(pictures)} images"

