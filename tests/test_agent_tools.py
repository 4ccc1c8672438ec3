"""InternVL-U agent tools driven by a real LangChain agent, on the tiny checkpoint (CPU).

The agent's chat model is scripted (no LLM); the tools, the toolkit and the core are real.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import torch
from conftest import NO_GPU_REASON
from langchain.agents import create_agent
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image
from pydantic import Field

from agent_tools import PROGRESS_EVENT, InternVLUToolkit
from internvl_u_core import DEFAULT_LIMITS, InternVLUPipeline, ModelLoadError

FIXTURE = Path(__file__).parent / "fixtures" / "internvlu-tiny"
IMAGE_ID = re.compile(r"img_[0-9a-f]{12}")
REASONING_ID = re.compile(r"rsn_[0-9a-f]{12}")
FAST = {"width": 64, "height": 64, "steps": 2}


# --------------------------------------------------------------------------------------------
# A scripted chat model: each step is an AIMessage, or a function of the conversation so far
# (so a later tool call can use an id that an earlier tool result printed).
# --------------------------------------------------------------------------------------------
class ScriptedChatModel(BaseChatModel):
    """Replays `steps` one per model call and records what it was shown."""

    steps: list[Any]  # AIMessage, or a function (messages so far) -> AIMessage
    seen: list[list[BaseMessage]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any):
        self.seen.append(list(messages))
        step = self.steps[len(self.seen) - 1]
        message = step(messages) if callable(step) else step
        return ChatResult(generations=[ChatGeneration(message=message)])


def call(name: str, call_id: str, **args: Any) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": name, "args": args, "id": call_id, "type": "tool_call"}])


def last_tool_text(messages: list[BaseMessage]) -> str:
    return next(m for m in reversed(messages) if isinstance(m, ToolMessage)).text


def tool_messages(result: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class ProgressRecorder(BaseCallbackHandler):
    """Collects the tools' progress events as (tool run id, data)."""

    def __init__(self) -> None:
        self.events: list[tuple[UUID, dict[str, Any]]] = []

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if name == PROGRESS_EVENT:
            self.events.append((run_id, data))


# --------------------------------------------------------------------------------------------
# Fixtures: one real pipeline per module, a fresh toolkit and folders per test.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipeline() -> InternVLUPipeline:
    return InternVLUPipeline.from_pretrained(FIXTURE / "checkpoint", torch_dtype="float32", device="cpu")


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    inputs, outputs, outside = tmp_path / "inputs", tmp_path / "outputs", tmp_path / "outside"
    inputs.mkdir()
    outside.mkdir()
    shutil.copy(FIXTURE / "inputs" / "img_fox_80x60.png", inputs / "fox.png")
    shutil.copy(FIXTURE / "inputs" / "img_lake_70x70.png", outside / "secret.png")
    return {"inputs": inputs, "outputs": outputs, "outside": outside}


@pytest.fixture
def toolkit(tiny_pipeline: InternVLUPipeline, folders: dict[str, Path]) -> InternVLUToolkit:
    return InternVLUToolkit(model=tiny_pipeline, output_dir=folders["outputs"], allowed_dirs=[folders["inputs"]])


@pytest.fixture
def lazy_toolkit(folders: dict[str, Path]) -> InternVLUToolkit:
    """A toolkit over a checkpoint path: the model is loaded only if a job reaches it."""
    return InternVLUToolkit(
        model=FIXTURE / "checkpoint", output_dir=folders["outputs"], allowed_dirs=[folders["inputs"]]
    )


def tool(kit: InternVLUToolkit, name: str):
    return next(t for t in kit.get_tools() if t.name == name)


def invoke(kit: InternVLUToolkit, name: str, call_id: str = "call_1", **args: Any) -> ToolMessage:
    return tool(kit, name).invoke({"name": name, "args": args, "id": call_id, "type": "tool_call"})


# --------------------------------------------------------------------------------------------
# The toolkit's public interface
# --------------------------------------------------------------------------------------------
def test_toolkit_offers_four_tools_with_bounded_schemas(lazy_toolkit: InternVLUToolkit) -> None:
    tools = lazy_toolkit.get_tools()
    assert [t.name for t in tools] == ["understand_image", "reason", "generate_image", "edit_image"]
    schema = tool(lazy_toolkit, "generate_image").tool_call_schema.model_json_schema()
    width = schema["properties"]["width"]["anyOf"][0]
    assert (width["minimum"], width["maximum"]) == (DEFAULT_LIMITS.min_side, DEFAULT_LIMITS.max_side)
    assert schema["properties"]["steps"]["maximum"] == DEFAULT_LIMITS.max_steps
    assert schema["required"] == ["prompt"]
    assert all(t.response_format == "content_and_artifact" and t.handle_tool_error for t in tools)
    assert not lazy_toolkit.session.runner.is_loaded  # building the tools loads nothing


# --------------------------------------------------------------------------------------------
# End to end: a real agent, scripted model, understand -> generate -> edit by id -> reason
# --------------------------------------------------------------------------------------------
def test_agent_understands_generates_edits_by_id_and_reasons(
    tiny_pipeline: InternVLUPipeline, toolkit: InternVLUToolkit, folders: dict[str, Path]
) -> None:
    def edit_generated(messages: list[BaseMessage]) -> AIMessage:
        generated_id = IMAGE_ID.search(last_tool_text(messages)).group()
        return call(
            "edit_image", "call_edit", images=[generated_id], instruction="Make the sky purple", steps=2, seed=7
        )

    def reason_about_edited(messages: list[BaseMessage]) -> AIMessage:
        edited_id = IMAGE_ID.findall(last_tool_text(messages))[-1]
        return call("reason", "call_reason", prompt="Add a scarf to the fox", images=[edited_id], max_new_tokens=8)

    model = ScriptedChatModel(
        steps=[
            call("understand_image", "call_understand", images=["fox.png"], question="What is this?", max_new_tokens=8),
            call("generate_image", "call_generate", prompt="A red fox sitting in the snow", seed=42, **FAST),
            edit_generated,
            reason_about_edited,
            AIMessage("Done."),
        ]
    )
    agent = create_agent(model, tools=toolkit.get_tools())
    result = agent.invoke({"messages": [HumanMessage("Look at fox.png, draw a fox, edit it, then plan a scarf.")]})

    understood, generated, edited, reasoned = tool_messages(result)
    assert [m.tool_call_id for m in (understood, generated, edited, reasoned)] == [
        "call_understand",
        "call_generate",
        "call_edit",
        "call_reason",
    ]
    assert all(m.status == "success" for m in (understood, generated, edited, reasoned))
    assert result["messages"][-1].text == "Done."

    # understand: the answer and the input file
    assert understood.artifact["input_images"][0]["path"] == str(folders["inputs"] / "fox.png")
    assert understood.artifact["answer"] in understood.text

    # generate: one 64x64 PNG in the output folder, named in text and artifact
    new_image = generated.artifact["images"][0]
    generated_path = Path(new_image["path"])
    assert generated_path.parent == folders["outputs"].resolve() and generated_path.suffix == ".png"
    assert Image.open(generated_path).size == (64, 64)
    assert new_image["image_id"] in generated.text and str(generated_path) in generated.text
    assert "seed 42" in generated.text

    # edit: took the generated image by id, wrote a new PNG
    source = edited.artifact["input_images"][0]
    assert source["image_id"] == new_image["image_id"] and source["path"] == str(generated_path)
    edited_path = Path(edited.artifact["images"][0]["path"])
    assert edited_path.is_file() and edited_path != generated_path
    expected = tiny_pipeline.edit(Image.open(generated_path).convert("RGB"), "Make the sky purple", steps=2, seed=7)
    assert np.array_equal(pixels(edited_path), np.asarray(expected[0]))

    # reason: a reasoning id over the edited image, and the model saw it in the next turn
    assert reasoned.artifact["input_images"][0]["image_id"] == edited.artifact["images"][0]["image_id"]
    assert REASONING_ID.fullmatch(reasoned.artifact["reasoning_id"])
    assert reasoned.artifact["reasoning_id"] in model.seen[-1][-1].text

    # exactly the two pictures are on disk, nothing half-written
    assert sorted(p.name for p in folders["outputs"].iterdir()) == sorted([generated_path.name, edited_path.name])


def test_generate_follows_an_earlier_reasoning(tiny_pipeline: InternVLUPipeline, toolkit: InternVLUToolkit) -> None:
    prompt = "A lighthouse that shows hope"
    reasoned = invoke(toolkit, "reason", prompt=prompt, max_new_tokens=8)
    reasoning_id = reasoned.artifact["reasoning_id"]
    assert f"reasoning_id='{reasoning_id}'" in reasoned.text

    generated = invoke(toolkit, "generate_image", prompt=prompt, reasoning_id=reasoning_id, seed=5, **FAST)
    assert generated.status == "success" and generated.artifact["reasoning_id"] == reasoning_id

    reasoning = tiny_pipeline.reason(prompt, max_new_tokens=8)
    expected = tiny_pipeline.generate(prompt, reasoning=reasoning, seed=5, **FAST)
    assert np.array_equal(pixels(generated.artifact["images"][0]["path"]), np.asarray(expected[0]))


def test_random_seed_is_reported_and_reproduces(toolkit: InternVLUToolkit) -> None:
    first = invoke(toolkit, "generate_image", prompt="A blue house", **FAST)
    seed = first.artifact["seed"]
    assert f"seed {seed}" in first.text
    again = invoke(toolkit, "generate_image", prompt="A blue house", seed=seed, **FAST)
    assert np.array_equal(pixels(first.artifact["images"][0]["path"]), pixels(again.artifact["images"][0]["path"]))
    assert first.artifact["images"][0]["image_id"] != again.artifact["images"][0]["image_id"]


def test_images_go_to_the_model_only_when_asked(tiny_pipeline: InternVLUPipeline, folders: dict[str, Path]) -> None:
    kit = InternVLUToolkit(
        model=tiny_pipeline, output_dir=folders["outputs"], return_images="thumbnail", thumbnail_size=32
    )
    message = invoke(kit, "generate_image", prompt="A cat", seed=1, **FAST)
    text, image = message.content
    assert text["type"] == "text" and IMAGE_ID.search(text["text"])
    assert image["type"] == "image" and image["mime_type"] == "image/png" and image["base64"]
    assert image["extras"]["image_id"] == message.artifact["images"][0]["image_id"]

    plain = invoke(
        InternVLUToolkit(model=tiny_pipeline, output_dir=folders["outputs"]), "generate_image", prompt="A cat"
    )
    assert isinstance(plain.content, str) and "base64" not in str(plain.artifact)


# --------------------------------------------------------------------------------------------
# Parallel tool calls: one job at a time, results not mixed up
# --------------------------------------------------------------------------------------------
def _parallel_calls() -> AIMessage:
    calls = [
        {"name": "generate_image", "args": {"prompt": "A red fox", "seed": 1, **FAST}, "id": "call_a"},
        {"name": "generate_image", "args": {"prompt": "A red fox", "seed": 2, **FAST}, "id": "call_b"},
        {
            "name": "understand_image",
            "args": {"images": "fox.png", "question": "Describe it.", "max_new_tokens": 6},
            "id": "call_c",
        },
        {
            "name": "edit_image",
            "args": {"images": ["fox.png"], "instruction": "Add snow", "seed": 3, **FAST},
            "id": "call_d",
        },
    ]
    return AIMessage("", tool_calls=[{**c, "type": "tool_call"} for c in calls])


def _assert_parallel_results(result: dict[str, Any], recorder: ProgressRecorder, pipe: InternVLUPipeline) -> None:
    by_call = {m.tool_call_id: m for m in tool_messages(result)}
    assert set(by_call) == {"call_a", "call_b", "call_c", "call_d"}
    assert all(m.status == "success" for m in by_call.values())
    assert (by_call["call_a"].artifact["seed"], by_call["call_b"].artifact["seed"]) == (1, 2)
    paths = {by_call[c].artifact["images"][0]["path"] for c in ("call_a", "call_b", "call_d")}
    assert len(paths) == 3
    for call_id, seed in (("call_a", 1), ("call_b", 2)):
        alone = pipe.generate("A red fox", seed=seed, **FAST)[0]
        assert np.array_equal(pixels(by_call[call_id].artifact["images"][0]["path"]), np.asarray(alone))
    # the model ran one job at a time: each run's progress events form one unbroken block
    runs = [run_id for run_id, _ in recorder.events]
    blocks = [run for i, run in enumerate(runs) if i == 0 or runs[i - 1] != run]
    assert len(blocks) == len(set(blocks)) == 4


def test_parallel_tool_calls_are_serialised(tiny_pipeline: InternVLUPipeline, toolkit: InternVLUToolkit) -> None:
    agent = create_agent(ScriptedChatModel(steps=[_parallel_calls(), AIMessage("ok")]), tools=toolkit.get_tools())
    recorder = ProgressRecorder()
    result = agent.invoke({"messages": [HumanMessage("four things at once")]}, config={"callbacks": [recorder]})
    _assert_parallel_results(result, recorder, tiny_pipeline)


class TimelineRecorder(ProgressRecorder):
    """Also notes every progress event in a timeline shared with the event loop's heartbeat."""

    def __init__(self, timeline: list[tuple[str, UUID | None]]) -> None:
        super().__init__()
        self.timeline = timeline

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        super().on_custom_event(name, data, run_id=run_id, **kwargs)
        if name == PROGRESS_EVENT:
            self.timeline.append(("event", run_id))


@pytest.mark.asyncio
async def test_async_agent_parallel_calls_do_not_block_the_event_loop(
    tiny_pipeline: InternVLUPipeline, toolkit: InternVLUToolkit
) -> None:
    agent = create_agent(ScriptedChatModel(steps=[_parallel_calls(), AIMessage("ok")]), tools=toolkit.get_tools())
    timeline: list[tuple[str, UUID | None]] = []
    recorder = TimelineRecorder(timeline)

    async def heartbeat() -> None:
        while True:
            timeline.append(("tick", None))
            await asyncio.sleep(0.001)

    beating = asyncio.create_task(heartbeat())
    result = await agent.ainvoke({"messages": [HumanMessage("four things at once")]}, config={"callbacks": [recorder]})
    beating.cancel()

    def ticks_during(run_id: UUID) -> int:
        """Heartbeats between a job's first and last progress report: the loop ran while the job did."""
        reports = [i for i, (kind, run) in enumerate(timeline) if kind == "event" and run == run_id]
        return sum(kind == "tick" for kind, _ in timeline[reports[0] : reports[-1]])

    runs = {run for kind, run in timeline if kind == "event"}
    assert len(runs) == 4 and any(ticks_during(run) for run in runs), "the event loop stalled while tools ran"
    _assert_parallel_results(result, recorder, tiny_pipeline)


# --------------------------------------------------------------------------------------------
# Progress and cancellation
# --------------------------------------------------------------------------------------------
def test_progress_is_reported_through_callbacks(toolkit: InternVLUToolkit) -> None:
    recorder = ProgressRecorder()
    generate = tool(toolkit, "generate_image")
    generate.invoke(
        {"prompt": "A tree", "seed": 1, "width": 64, "height": 64, "steps": 3}, config={"callbacks": [recorder]}
    )
    steps = [data for _, data in recorder.events if data["stage"] == "denoising"]
    assert [(d["tool"], d["step"], d["total"]) for d in steps] == [("generate_image", i, 3) for i in (1, 2, 3)]


@pytest.mark.asyncio
async def test_progress_shows_in_astream_events(toolkit: InternVLUToolkit) -> None:
    generate = tool(toolkit, "generate_image")
    events = [
        event
        async for event in generate.astream_events({"prompt": "A tree", "seed": 1, **FAST}, version="v2")
        if event["event"] == "on_custom_event" and event["name"] == PROGRESS_EVENT
    ]
    assert [e["data"]["step"] for e in events] == [1, 2]


async def cancel_a_slow_generation_at_its_first_step(kit: InternVLUToolkit, side: int) -> None:
    """Start a 100-step generate_image task, cancel it at its first denoising step, see it end cancelled."""
    first_step = asyncio.Event()

    class StepWatcher(AsyncCallbackHandler):
        async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            if data.get("stage") == "denoising":
                first_step.set()

    task = asyncio.create_task(
        tool(kit, "generate_image").ainvoke(
            {"prompt": "A slow picture", "seed": 1, "width": side, "height": side, "steps": 100},
            config={"callbacks": [StepWatcher()]},
        )
    )
    await asyncio.wait_for(first_step.wait(), timeout=60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_cancelling_the_task_stops_the_core(
    toolkit: InternVLUToolkit, folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent_tools")
    await cancel_a_slow_generation_at_its_first_step(toolkit, side=64)

    # the next job queues behind the cancelled one, so once it is done the first has stopped
    answer = await tool(toolkit, "understand_image").ainvoke(
        {"images": ["fox.png"], "question": "Hi", "max_new_tokens": 2}
    )
    assert answer.startswith("Answer about")
    assert any("cancelled" in record.getMessage() for record in caplog.records)
    assert not list(folders["outputs"].glob("*.png"))


# --------------------------------------------------------------------------------------------
# Safety: confined paths, unguessable ids, limits, errors the agent can act on
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref",
    [
        "../outside/secret.png",
        "../../outside/secret.png",
        "sub/../../outside/secret.png",
        "/etc/passwd",
        "/etc/hostname",
    ],
)
def test_paths_outside_the_allowed_folders_are_refused(lazy_toolkit: InternVLUToolkit, ref: str) -> None:
    message = invoke(lazy_toolkit, "understand_image", images=[ref], question="What is this?")
    assert message.status == "error"
    assert "outside the folders this tool may read" in message.text
    assert not lazy_toolkit.session.runner.is_loaded


def test_absolute_path_outside_and_symlink_escapes_are_refused(
    lazy_toolkit: InternVLUToolkit, folders: dict[str, Path]
) -> None:
    secret = folders["outside"] / "secret.png"
    (folders["inputs"] / "link.png").symlink_to(secret)
    (folders["inputs"] / "linked_dir").symlink_to(folders["outside"], target_is_directory=True)
    for ref in (str(secret), "link.png", "linked_dir/secret.png", str(folders["inputs"] / "link.png")):
        message = invoke(lazy_toolkit, "edit_image", images=[ref], instruction="Make it red")
        assert message.status == "error" and "outside the folders" in message.text, ref
    # an "id" planted as a symlink in the output folder is not followed either
    folders["outputs"].mkdir()
    (folders["outputs"] / "img_0123456789ab.png").symlink_to(secret)
    message = invoke(lazy_toolkit, "understand_image", images=["img_0123456789ab"], question="?")
    assert message.status == "error" and "Cannot open 'img_0123456789ab'" in message.text
    assert not lazy_toolkit.session.runner.is_loaded


def test_unknown_ids_are_refused_with_a_hint(lazy_toolkit: InternVLUToolkit) -> None:
    for ref in ("img_000000000000", "img_1", "img_fox"):
        message = invoke(lazy_toolkit, "edit_image", images=[ref], instruction="Make it red")
        assert message.status == "error"
        assert f"Unknown image id '{ref}'" in message.text and "earlier tool result" in message.text
    message = invoke(lazy_toolkit, "generate_image", prompt="A cat", reasoning_id="rsn_000000000000")
    assert message.status == "error" and "Unknown reasoning id 'rsn_000000000000'" in message.text
    assert not lazy_toolkit.session.runner.is_loaded


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("missing.png", "No file at 'missing.png'"),
        ("notes.txt", "is not an image this tool reads"),
        (".", "is not a regular file"),
        ("https://example.com/cat.png", "URL or inline data"),
        ("data:image/png;base64,iVBORw0KGgo=", "URL or inline data"),
    ],
)
def test_bad_inputs_are_explained(
    lazy_toolkit: InternVLUToolkit, folders: dict[str, Path], ref: str, expected: str
) -> None:
    (folders["inputs"] / "notes.txt").write_text("not a picture")
    message = invoke(lazy_toolkit, "understand_image", images=[ref], question="What is this?")
    assert message.status == "error" and expected in message.text


def test_input_limits_are_enforced(folders: dict[str, Path]) -> None:
    from agent_tools import ToolLimits

    small = InternVLUToolkit(
        model=FIXTURE / "checkpoint",
        output_dir=folders["outputs"],
        allowed_dirs=[folders["inputs"]],
        limits=ToolLimits(max_input_bytes=1000, max_input_pixels=1000, max_steps=10),
    )
    too_big = invoke(small, "understand_image", images=["fox.png"], question="?")
    assert too_big.status == "error" and "MiB" in too_big.text and "smaller" in too_big.text

    pixels_limited = InternVLUToolkit(
        model=FIXTURE / "checkpoint",
        output_dir=folders["outputs"],
        allowed_dirs=[folders["inputs"]],
        limits=ToolLimits(max_input_pixels=1000),
    )
    too_many = invoke(pixels_limited, "understand_image", images=["fox.png"], question="?")
    assert too_many.status == "error" and "80x60 pixels" in too_many.text

    steps = invoke(small, "generate_image", prompt="A cat", steps=50)
    assert steps.status == "error" and "steps=50 is above this tool's limit of 10" in steps.text


def test_bad_arguments_are_explained(lazy_toolkit: InternVLUToolkit) -> None:
    message = invoke(lazy_toolkit, "generate_image", prompt="A cat", width=5000, steps=0)
    assert message.status == "error"
    assert message.text.startswith("Invalid arguments:")
    assert "width" in message.text and "steps" in message.text


def test_core_refusals_become_tool_errors(toolkit: InternVLUToolkit) -> None:
    message = invoke(toolkit, "generate_image", prompt="A cat\x00", **FAST)
    assert message.status == "error" and message.text.startswith("The model refused the request:")
    assert "NUL" in message.text


def test_model_path_is_loaded_on_first_use(lazy_toolkit: InternVLUToolkit) -> None:
    recorder = ProgressRecorder()
    assert not lazy_toolkit.session.runner.is_loaded
    message = tool(lazy_toolkit, "generate_image").invoke(
        {"name": "generate_image", "args": {"prompt": "A cat", "seed": 3, **FAST}, "id": "call_1", "type": "tool_call"},
        config={"callbacks": [recorder]},
    )
    assert message.status == "success" and Path(message.artifact["images"][0]["path"]).is_file()
    assert lazy_toolkit.session.runner.is_loaded
    stages = [data["stage"] for _, data in recorder.events]
    assert stages[0] == "loading" and stages[-1] == "denoising"


def test_quantization_is_a_toolkit_field_passed_to_the_loader(folders: dict[str, Path]) -> None:
    kit = InternVLUToolkit(model=FIXTURE / "checkpoint", output_dir=folders["outputs"], quantization="int8",
                           load_kwargs={"device": "cpu"})
    made = invoke(kit, "generate_image", prompt="A cat", seed=1, **FAST)
    assert made.artifact["images"] and kit.load().quantization.mode == "int8"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_modes_this_machine_cannot_run_are_refused_when_the_toolkit_is_made(
    folders: dict[str, Path], tiny_pipeline: InternVLUPipeline
) -> None:
    # pydantic reports the core's message in its ValidationError (a ValueError).
    with pytest.raises(ValueError, match="quantization='nf4' needs a CUDA GPU"):
        InternVLUToolkit(model=FIXTURE / "checkpoint", output_dir=folders["outputs"], quantization="nf4")
    with pytest.raises(ValueError, match=f"offload='group' .*{NO_GPU_REASON}"):
        InternVLUToolkit(model=FIXTURE / "checkpoint", output_dir=folders["outputs"], offload="group")
    with pytest.raises(ValueError, match="apply when the toolkit loads the model"):
        InternVLUToolkit(model=tiny_pipeline, output_dir=folders["outputs"], quantization="int8")


def test_real_faults_are_not_swallowed(folders: dict[str, Path]) -> None:
    broken = InternVLUToolkit(model=folders["outside"], output_dir=folders["outputs"])
    with pytest.raises(ModelLoadError):
        invoke(broken, "generate_image", prompt="A cat")


def test_image_ids_are_random_not_counters(toolkit: InternVLUToolkit) -> None:
    made = invoke(toolkit, "generate_image", prompt="A cat", seed=1, num_images=3, **FAST)
    ids = [item["image_id"] for item in made.artifact["images"]]
    assert len(set(ids)) == 3 and all(IMAGE_ID.fullmatch(i) for i in ids)
    numbers = sorted(int(i[4:], 16) for i in ids)
    assert numbers[1] - numbers[0] != 1 or numbers[2] - numbers[1] != 1


def test_application_registered_image_gets_an_id(toolkit: InternVLUToolkit, folders: dict[str, Path]) -> None:
    image_id = toolkit.add_image(folders["outside"] / "secret.png")  # trusted: the application, not the agent
    message = invoke(toolkit, "understand_image", images=[image_id], question="What is this?", max_new_tokens=2)
    assert message.status == "success" and message.artifact["input_images"][0]["image_id"] == image_id


def test_agent_recovers_from_refusals(lazy_toolkit: InternVLUToolkit, folders: dict[str, Path]) -> None:
    model = ScriptedChatModel(
        steps=[
            call("edit_image", "call_1", images=["../outside/secret.png"], instruction="Make it red"),
            call("edit_image", "call_2", images=["img_0123456789ab"], instruction="Make it red"),
            AIMessage("I cannot reach that image."),
        ]
    )
    result = create_agent(model, tools=lazy_toolkit.get_tools()).invoke({"messages": [HumanMessage("edit it")]})
    outside, unknown = tool_messages(result)
    assert outside.status == unknown.status == "error"
    assert "outside the folders" in outside.text and "Unknown image id 'img_0123456789ab'" in unknown.text
    assert str(folders["outside"]) not in outside.text  # the refusal does not reveal the other folder
    assert result["messages"][-1].text == "I cannot reach that image."


# --------------------------------------------------------------------------------------------
# A served model: InternVLUToolkit(model="http://host:port") against a real `internvl-u serve`
# --------------------------------------------------------------------------------------------
@pytest.fixture
def remote_toolkit(served: Any, folders: dict[str, Path]) -> InternVLUToolkit:
    return InternVLUToolkit(model=served.url, api_key=served.api_key, timeout=300, output_dir=folders["outputs"],
                            allowed_dirs=[folders["inputs"]])


def test_agent_on_a_served_model_gives_the_local_outputs(
    tiny_pipeline: InternVLUPipeline, remote_toolkit: InternVLUToolkit, folders: dict[str, Path]
) -> None:
    """The scripted agent of the local test, tool for tool, on the server: the same answers and pixels."""
    def generate_reasoned(messages: list[BaseMessage]) -> AIMessage:
        reasoning_id = REASONING_ID.search(last_tool_text(messages)).group()
        return call("generate_image", "call_generate", prompt="A fox that shows hope", reasoning_id=reasoning_id,
                    seed=42, **FAST)

    def edit_generated(messages: list[BaseMessage]) -> AIMessage:
        generated_id = IMAGE_ID.search(last_tool_text(messages)).group()
        return call("edit_image", "call_edit", images=[generated_id, "fox.png"], instruction="Put them together",
                    steps=2, seed=7, width=48, height=32)

    model = ScriptedChatModel(
        steps=[
            call("understand_image", "call_understand", images=["fox.png"], question="What is this?", max_new_tokens=8),
            call("reason", "call_reason", prompt="A fox that shows hope", max_new_tokens=8),
            generate_reasoned,
            edit_generated,
            AIMessage("Done."),
        ]
    )
    recorder = ProgressRecorder()
    agent = create_agent(model, tools=remote_toolkit.get_tools())
    result = agent.invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [recorder]})
    understood, reasoned, generated, edited = tool_messages(result)
    assert all(m.status == "success" for m in (understood, reasoned, generated, edited))

    fox = Image.open(folders["inputs"] / "fox.png").convert("RGB")
    assert understood.artifact["answer"] == tiny_pipeline.understand([fox], "What is this?", max_new_tokens=8)
    reasoning = tiny_pipeline.reason("A fox that shows hope", max_new_tokens=8)
    assert reasoned.artifact["text"] == reasoning.text and reasoned.artifact["num_tokens"] == len(reasoning.token_ids)
    drawn = tiny_pipeline.generate("A fox that shows hope", reasoning=reasoning, seed=42, **FAST)[0]
    generated_path = generated.artifact["images"][0]["path"]
    assert np.array_equal(pixels(generated_path), np.asarray(drawn))
    expected = tiny_pipeline.edit([drawn, fox], "Put them together", steps=2, seed=7, width=48, height=32)[0]
    assert np.array_equal(pixels(edited.artifact["images"][0]["path"]), np.asarray(expected))
    stages = [data["stage"] for _, data in recorder.events]
    assert {"answering", "reasoning", "denoising"} <= set(stages)  # progress streams from the server


@pytest.mark.asyncio
async def test_cancelling_a_served_job_cancels_it_on_the_server(remote_toolkit: InternVLUToolkit, served: Any) -> None:
    before = served.health()["cancelled"]
    await cancel_a_slow_generation_at_its_first_step(remote_toolkit, side=256)
    await asyncio.to_thread(served.wait_for, lambda health: health["cancelled"] == before + 1 and health["running"] == 0)


def test_served_model_key_and_options(served: Any, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from internvl_u_core import RemoteError

    monkeypatch.setenv("INTERNVL_U_API_KEY", served.api_key)  # no api_key given: the environment's
    from_env = InternVLUToolkit(model=served.url, output_dir=folders["outputs"], allowed_dirs=[folders["inputs"]])
    assert invoke(from_env, "understand_image", images=["fox.png"], question="Hi", max_new_tokens=2).status == "success"
    wrong = InternVLUToolkit(model=served.url, api_key="wrong", output_dir=folders["outputs"],
                             allowed_dirs=[folders["inputs"]])
    with pytest.raises(RemoteError, match="API key"):  # a fault of the deployment, not of the agent's request
        invoke(wrong, "understand_image", images=["fox.png"], question="Hi")
    with pytest.raises(ValueError, match="load_kwargs apply to a model loaded here"):
        InternVLUToolkit(model=served.url, load_kwargs={"device": "cpu"}, output_dir=folders["outputs"])
    with pytest.raises(ValueError, match="'internvl-u serve' \\(--quantize, --offload\\) for a served model"):
        InternVLUToolkit(model=served.url, quantization="bf16", output_dir=folders["outputs"])
    with pytest.raises(ValueError, match="api_key is for a served model"):
        InternVLUToolkit(model=FIXTURE / "checkpoint", api_key="x", output_dir=folders["outputs"])
    assert "wrong" not in repr(wrong)  # the key is a SecretStr


def test_importing_without_langchain_names_the_agents_extra():
    probe = "import sys; sys.modules['langchain_core'] = None; import agent_tools"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert 'pip install -e ".[agents]"' in result.stderr and "langchain-core>=1.0,<2" in result.stderr


def test_relative_paths_resolve_from_the_working_directory_first(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With allowed_dirs=["inputs"], "inputs/fox.png" (as typed in a shell) and "fox.png" both work."""
    monkeypatch.chdir(folders["inputs"].parent)
    kit = InternVLUToolkit(model=FIXTURE / "checkpoint", output_dir="outputs", allowed_dirs=["inputs"])
    for ref in ("inputs/fox.png", "fox.png", str(folders["inputs"] / "fox.png")):
        message = invoke(kit, "understand_image", images=[ref], question="?")
        assert "No file" not in message.text and "outside" not in message.text, (ref, message.text)
    missing = invoke(kit, "understand_image", images=["inputs/gone.png"], question="?")
    here, inside = folders["inputs"] / "gone.png", folders["inputs"] / "inputs" / "gone.png"
    assert missing.status == "error" and f"looked for {here}, {inside}" in missing.text
    # Still confined: a path to a file beside the allowed folder is looked for only inside them.
    beside = invoke(kit, "understand_image", images=["outside/secret.png"], question="?")
    assert beside.status == "error" and "No file at 'outside/secret.png'" in beside.text
    refused = invoke(kit, "understand_image", images=["../outside/secret.png"], question="?")
    assert refused.status == "error" and "outside the folders" in refused.text, refused.text
