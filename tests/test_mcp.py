"""`internvl-u mcp` driven by the MCP SDK's own client, over stdio and streamable HTTP (CPU).

The server is a real subprocess on the tiny checkpoint; every result is compared with the
same call on an in-process `InternVLUPipeline`.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult
from PIL import Image
from serving import free_port

from internvl_u_core import DEFAULT_LIMITS, InternVLUPipeline
from internvl_u_core.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "internvlu-tiny"
CHECKPOINT = FIXTURE / "checkpoint"
FAST = {"width": 64, "height": 64, "steps": 2}
IMAGE_ID = re.compile(r"img_[0-9a-f]{12}")


def server_command(folders: dict[str, Path], *extra: str) -> list[str]:
    return [
        "-m", "internvl_u_core.cli", "mcp", "--model", str(CHECKPOINT), "--device", "cpu", "--dtype", "float32",
        "--output-dir", str(folders["outputs"]), "--allowed-dir", str(folders["inputs"]), *extra,
    ]


def server_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


class Session:
    """A connected MCP client, callable from synchronous tests (its event loop runs in a portal)."""

    def __init__(self, portal: BlockingPortal, client: Client) -> None:
        self.portal = portal
        self.client = client

    def tools(self) -> dict[str, Any]:
        return {tool.name: tool for tool in self.portal.call(self.client.list_tools).tools}

    def call(self, name: str, progress: list[tuple[float, float | None, str | None]] | None = None,
             **arguments: Any) -> CallToolResult:
        async def record(done: float, total: float | None, message: str | None) -> None:
            if progress is not None:
                progress.append((done, total, message))

        return self.portal.call(partial(self.client.call_tool, name, arguments, progress_callback=record))


def pixels(image: Image.Image | str | Path) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    with Image.open(image) as opened:
        return np.asarray(opened.convert("RGB"))


def returned_images(result: CallToolResult) -> list[Image.Image]:
    """The PNG image contents of a tool result, decoded."""
    images = []
    for block in result.content:
        if block.type == "image":
            assert block.mime_type == "image/png"
            data = base64.b64decode(block.data)
            assert data.startswith(b"\x89PNG")
            images.append(Image.open(io.BytesIO(data)))
    return images


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


# --------------------------------------------------------------------------------------------
# Fixtures: one server process for the module (the in-process pipeline is conftest's tiny_pipe).
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mcp")
    inputs, outputs, outside = root / "inputs", root / "outputs", root / "outside"
    (inputs / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(FIXTURE / "inputs" / "img_fox_80x60.png", inputs / "fox.png")
    shutil.copy(FIXTURE / "inputs" / "img_lake_70x70.png", outside / "secret.png")
    (inputs / "link.png").symlink_to(outside / "secret.png")
    (inputs / "linked_dir").symlink_to(outside, target_is_directory=True)
    return {"root": root, "inputs": inputs, "outputs": outputs, "outside": outside, "log": root / "server.log"}


@pytest.fixture(scope="module")
def session(folders: dict[str, Path]) -> Iterator[Session]:
    params = StdioServerParameters(command=sys.executable, args=server_command(folders), env=server_env())
    with (
        folders["log"].open("w") as log,
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(Client(stdio_client(params, errlog=log))) as client,
    ):
        yield Session(portal, client)


# --------------------------------------------------------------------------------------------
# Tools, schemas, annotations
# --------------------------------------------------------------------------------------------
def test_lists_four_tools_with_bounds_from_the_core_limits(session: Session, tiny_pipe: InternVLUPipeline) -> None:
    tools = session.tools()
    assert list(tools) == ["understand_image", "reason", "generate_image", "edit_image"]
    limits = tiny_pipe.limits

    generate = tools["generate_image"].input_schema["properties"]
    assert generate["width"]["anyOf"][0]["maximum"] == limits.max_side
    assert generate["width"]["anyOf"][0]["minimum"] == limits.min_side
    assert generate["seed"]["anyOf"][0]["maximum"] == limits.max_seed
    assert generate["guidance_scale"]["anyOf"][0]["maximum"] == limits.max_guidance_scale
    assert generate["steps"]["anyOf"][0] == {"maximum": limits.max_steps, "minimum": 1, "type": "integer"}
    assert generate["num_images"]["anyOf"][0]["maximum"] == limits.max_output_images
    assert generate["prompt"]["maxLength"] == limits.max_prompt_chars
    assert tools["generate_image"].input_schema["required"] == ["prompt"]
    understand = tools["understand_image"].input_schema["properties"]
    assert understand["images"]["maxItems"] == limits.max_images_per_prompt
    assert understand["max_new_tokens"]["anyOf"][0]["maximum"] == limits.max_new_tokens
    assert tools["edit_image"].input_schema["required"] == ["images", "instruction"]

    for name in ("understand_image", "reason"):
        assert tools[name].annotations.read_only_hint is True
    for name in ("generate_image", "edit_image"):
        hints = tools[name].annotations
        assert hints.read_only_hint is False and hints.destructive_hint is False
    assert all(tool.description and tool.output_schema for tool in tools.values())


# --------------------------------------------------------------------------------------------
# Results equal the in-process pipeline's
# --------------------------------------------------------------------------------------------
def test_generate_returns_a_png_and_its_path_equal_to_in_process(
    session: Session, tiny_pipe: InternVLUPipeline
) -> None:
    progress: list[tuple[float, float | None, str | None]] = []
    result = session.call("generate_image", progress, prompt="A red fox", seed=7, **FAST)
    assert not result.is_error, text_of(result)
    (returned,) = returned_images(result)
    (saved,) = result.structured_content["images"]
    expected = tiny_pipe.generate("A red fox", seed=7, **FAST)[0]
    assert np.array_equal(pixels(returned), pixels(expected))
    assert np.array_equal(pixels(saved["path"]), pixels(expected))
    assert IMAGE_ID.fullmatch(saved["image_id"]) and Path(saved["path"]).name == f"{saved['image_id']}.png"
    assert saved["path"] in text_of(result) and saved["image_id"] in text_of(result)
    assert result.structured_content["seed"] == 7
    assert progress == [(1, 2, "denoising 1/2"), (2, 2, "denoising 2/2")]


def test_a_random_seed_is_reported_and_reproduces(session: Session) -> None:
    first = session.call("generate_image", prompt="A boat", **FAST)
    seed = first.structured_content["seed"]
    assert f"seed {seed}" in text_of(first)
    again = session.call("generate_image", prompt="A boat", seed=seed, **FAST)
    assert np.array_equal(pixels(returned_images(first)[0]), pixels(returned_images(again)[0]))


def test_understand_by_path_and_by_id_equals_in_process(
    session: Session, tiny_pipe: InternVLUPipeline, folders: dict[str, Path]
) -> None:
    fox = folders["inputs"] / "fox.png"
    for ref in ("fox.png", str(fox), "sub/../fox.png"):
        progress: list[tuple[float, float | None, str | None]] = []
        result = session.call("understand_image", progress, images=[ref], question="What animal is this?",
                              max_new_tokens=8)
        assert not result.is_error, text_of(result)
        assert progress and all(message.startswith("answering ") for _, _, message in progress)
        expected = tiny_pipe.understand(Image.open(fox), "What animal is this?", max_new_tokens=8)
        assert result.structured_content["answer"] == expected
        assert result.structured_content["input_images"][0]["path"] == str(fox.resolve())

    made = session.call("generate_image", prompt="A lake", seed=3, **FAST).structured_content["images"][0]
    by_id = session.call("understand_image", images=[made["image_id"]], question="Describe it.", max_new_tokens=6)
    expected = tiny_pipe.understand(Image.open(made["path"]), "Describe it.", max_new_tokens=6)
    assert by_id.structured_content["answer"] == expected
    assert by_id.structured_content["input_images"][0]["image_id"] == made["image_id"]


def test_reason_then_generate_with_the_reasoning_id_equals_in_process(
    session: Session, tiny_pipe: InternVLUPipeline
) -> None:
    prompt = "A castle on a hill at dusk"
    reasoned = session.call("reason", prompt=prompt, max_new_tokens=12)
    assert not reasoned.is_error, text_of(reasoned)
    reasoning_id = reasoned.structured_content["reasoning_id"]
    assert f"reasoning_id='{reasoning_id}'" in text_of(reasoned)
    expected_reasoning = tiny_pipe.reason(prompt, max_new_tokens=12)
    assert reasoned.structured_content["text"] == expected_reasoning.text

    drawn = session.call("generate_image", prompt=prompt, reasoning_id=reasoning_id, seed=11, **FAST)
    assert drawn.structured_content["reasoning_id"] == reasoning_id
    expected = tiny_pipe.generate(prompt, reasoning=expected_reasoning, seed=11, **FAST)[0]
    assert np.array_equal(pixels(returned_images(drawn)[0]), pixels(expected))


def test_edit_with_a_reasoning_equals_in_process(
    session: Session, tiny_pipe: InternVLUPipeline, folders: dict[str, Path]
) -> None:
    instruction = "Make the fox blue"
    reasoned = session.call("reason", prompt=instruction, images=["fox.png"], max_new_tokens=10)
    reasoning_id = reasoned.structured_content["reasoning_id"]
    assert "edit_image" in text_of(reasoned)

    edited = session.call("edit_image", images=["fox.png"], instruction=instruction, reasoning_id=reasoning_id,
                          seed=5, steps=2, num_images=2)
    assert not edited.is_error, text_of(edited)
    fox = Image.open(folders["inputs"] / "fox.png")
    reasoning = tiny_pipe.reason(instruction, [fox], max_new_tokens=10)
    expected = tiny_pipe.edit([fox], instruction, reasoning=reasoning, seed=5, steps=2, num_images=2)
    got = returned_images(edited)
    assert len(got) == 2 and all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(got, expected))
    assert got[0].size == fox.size  # the output keeps the input's size by default

    mismatch = session.call("generate_image", prompt=instruction, reasoning_id=reasoning_id, **FAST)
    assert mismatch.is_error and "reasoning was made for 1 input image(s)" in text_of(mismatch)


# --------------------------------------------------------------------------------------------
# Confinement and bad arguments: tool errors with a message the client's model can act on
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref",
    ["../outside/secret.png", "sub/../../outside/secret.png", "/etc/passwd", "link.png", "linked_dir/secret.png"],
)
def test_paths_outside_the_allowed_folders_are_refused(session: Session, folders: dict[str, Path], ref: str) -> None:
    result = session.call("understand_image", images=[ref], question="What is this?")
    assert result.is_error
    assert "outside the folders this tool may read" in text_of(result)
    assert "Use an image_id from an earlier result or a file inside those folders" in text_of(result)
    assert str(folders["outside"]) not in text_of(result)  # the refusal does not reveal where a link leads


def test_absolute_and_planted_escapes_are_refused(session: Session, folders: dict[str, Path]) -> None:
    outside = session.call("edit_image", images=[str(folders["outside"] / "secret.png")], instruction="Make it red")
    assert outside.is_error and "outside the folders" in text_of(outside)

    folders["outputs"].mkdir(exist_ok=True)
    (folders["outputs"] / "img_0123456789ab.png").symlink_to(folders["outside"] / "secret.png")
    planted = session.call("understand_image", images=["img_0123456789ab"], question="?")
    assert planted.is_error and "Cannot open 'img_0123456789ab'" in text_of(planted)


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        ("edit_image", {"images": ["img_000000000000"], "instruction": "x"}, "Unknown image id 'img_000000000000'"),
        ("understand_image", {"images": ["missing.png"], "question": "?"}, "No file at 'missing.png'"),
        ("understand_image", {"images": ["https://example.com/a.png"], "question": "?"}, "URL or inline data"),
        ("generate_image", {"prompt": "x", "reasoning_id": "rsn_000000000000"}, "Unknown reasoning id"),
        ("generate_image", {"prompt": "A cat\x00", **FAST}, "NUL"),  # refused by the core itself
    ],
)
def test_bad_references_are_explained(session: Session, tool: str, arguments: dict[str, Any], expected: str) -> None:
    result = session.call(tool, **arguments)
    assert result.is_error and expected in text_of(result)


@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        ("generate_image", {"prompt": "x", "width": 4097}, "width"),
        ("generate_image", {"prompt": "x", "steps": 0}, "steps"),
        ("generate_image", {"prompt": "x", "steps": 1001}, "steps"),
        ("generate_image", {"prompt": "x", "num_images": DEFAULT_LIMITS.max_output_images + 1}, "num_images"),
        ("generate_image", {"prompt": "x", "seed": -1}, "seed"),
        ("edit_image", {"images": [], "instruction": "x"}, "images"),
        ("understand_image", {"images": ["fox.png"], "question": "?", "max_new_tokens": 40000}, "max_new_tokens"),
        ("understand_image", {"images": ["fox.png"], "question": ""}, "question"),
    ],
)
def test_out_of_range_arguments_are_tool_errors(
    session: Session, tool: str, arguments: dict[str, Any], field: str
) -> None:
    result = session.call(tool, **arguments)
    assert result.is_error and field in text_of(result)


# --------------------------------------------------------------------------------------------
# One job at a time, cancellation
# --------------------------------------------------------------------------------------------
def test_parallel_calls_run_one_at_a_time_and_are_not_mixed_up(
    session: Session, tiny_pipe: InternVLUPipeline
) -> None:
    seeds = (21, 22, 23)
    steps: list[tuple[int, str]] = []

    async def call_all() -> dict[int, CallToolResult]:
        results: dict[int, CallToolResult] = {}

        async def one(seed: int) -> None:
            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                steps.append((seed, message or ""))

            arguments = {"prompt": f"Tile number {seed}", "seed": seed, "width": 64, "height": 64, "steps": 3}
            results[seed] = await session.client.call_tool("generate_image", arguments, progress_callback=on_progress)

        async with anyio.create_task_group() as group:
            for seed in seeds:
                group.start_soon(one, seed)
        return results

    results = session.portal.call(call_all)
    for seed in seeds:
        expected = tiny_pipe.generate(f"Tile number {seed}", seed=seed, width=64, height=64, steps=3)[0]
        assert np.array_equal(pixels(returned_images(results[seed])[0]), pixels(expected))
    order = [seed for seed, _ in steps]
    assert sorted(order) == sorted(seeds * 3)
    assert all(order[i] == order[i + 1] for i in range(len(order) - 1) if i % 3 != 2)  # each job's steps together


def test_cancelling_a_call_stops_the_job_and_frees_the_model(session: Session, folders: dict[str, Path]) -> None:
    before = set(folders["outputs"].glob("*"))

    async def call_then_cancel() -> list[str]:
        messages: list[str] = []
        started = anyio.Event()

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")
            started.set()

        async with anyio.create_task_group() as group:
            group.start_soon(
                partial(session.client.call_tool, "generate_image",
                        {"prompt": "A long job", "width": 256, "height": 256, "steps": 1000, "seed": 1},
                        progress_callback=on_progress)
            )
            await started.wait()
            group.cancel_scope.cancel()
        return messages

    messages = session.portal.call(call_then_cancel)
    assert messages[0] == "denoising 1/1000"
    # the next call waits for the cancelled job to end, so the log is written by then
    after = session.call("understand_image", images=["fox.png"], question="?", max_new_tokens=2)
    assert not after.is_error
    log = folders["log"].read_text()
    stopped = re.search(r"cancelled by the client: .* at step (\d+) of 1000", log)
    assert stopped and int(stopped.group(1)) < 1000
    assert set(folders["outputs"].glob("*")) == before  # nothing saved, nothing partial


# --------------------------------------------------------------------------------------------
# Streamable HTTP
# --------------------------------------------------------------------------------------------
def test_streamable_http_serves_the_same_tools(
    folders: dict[str, Path], tiny_pipe: InternVLUPipeline, tmp_path: Path
) -> None:
    port = free_port()
    with (tmp_path / "http.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, *server_command(folders, "--http", str(port), "--max-steps", "3")],
            env={**os.environ, **server_env()}, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300  # loading on a busy machine
        while not _accepting(port):
            assert process.poll() is None, (tmp_path / "http.log").read_text()
            assert time.monotonic() < deadline, "the server did not start listening"
            time.sleep(0.2)

        async def generate() -> tuple[dict[str, Any], CallToolResult, CallToolResult]:
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                tools = {tool.name: tool for tool in (await client.list_tools()).tools}
                refused = await client.call_tool("generate_image", {"prompt": "A kite", "steps": 4})
                return tools, await client.call_tool("generate_image", {"prompt": "A kite", "seed": 2, **FAST}), refused

        tools, result, refused = anyio.run(generate)
        assert list(tools) == ["understand_image", "reason", "generate_image", "edit_image"]
        # --max-steps 3 tightens the schema and the check; the refusal is in our words, not pydantic's report.
        assert tools["generate_image"].input_schema["properties"]["steps"]["anyOf"][0]["maximum"] == 3
        assert refused.is_error and "steps = 4" in text_of(refused) and "pydantic" not in text_of(refused)
        expected = tiny_pipe.generate("A kite", seed=2, **FAST)[0]
        assert np.array_equal(pixels(returned_images(result)[0]), pixels(expected))
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, (tmp_path / "http.log").read_text()


def _accepting(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------------------------
# A served model: `internvl-u mcp --model http://…` in front of a real `internvl-u serve`
# --------------------------------------------------------------------------------------------
def test_a_served_model_gives_the_in_process_results(
    folders: dict[str, Path], tiny_pipe: InternVLUPipeline, tmp_path: Path, served: Any
) -> None:
    command = ["-m", "internvl_u_core.cli", "mcp", "--model", served.url, "--output-dir", str(folders["outputs"]),
               "--allowed-dir", str(folders["inputs"])]
    params = StdioServerParameters(command=sys.executable, args=command,
                                   env={**server_env(), "INTERNVL_U_API_KEY": served.api_key})
    with (
        (tmp_path / "mcp.log").open("w") as log,
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(Client(stdio_client(params, errlog=log))) as client,
    ):
        remote = Session(portal, client)
        assert list(remote.tools()) == ["understand_image", "reason", "generate_image", "edit_image"]
        progress: list[tuple[float, float | None, str | None]] = []
        drawn = remote.call("generate_image", progress, prompt="A kite", seed=2, **FAST)
        answer = remote.call("understand_image", images=["fox.png"], question="What is it?", max_new_tokens=6)
    assert not drawn.is_error and not answer.is_error
    expected = tiny_pipe.generate("A kite", seed=2, **FAST)[0]
    assert np.array_equal(pixels(returned_images(drawn)[0]), pixels(expected))
    assert [message for *_, message in progress] == ["denoising 1/2", "denoising 2/2"]
    fox = Image.open(folders["inputs"] / "fox.png").convert("RGB")
    assert tiny_pipe.understand([fox], "What is it?", max_new_tokens=6) in text_of(answer)


def test_loading_options_do_not_go_with_a_served_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["mcp", "--model", "http://127.0.0.1:8091", "--dtype", "float32", "--offload"]) == 2
    assert "--dtype, --offload apply to a model loaded here" in capsys.readouterr().err
    assert cli_main(["serve", "--model", "http://127.0.0.1:8091"]) == 2
    assert "is a URL; this command serves a checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The command line and the package boundary
# --------------------------------------------------------------------------------------------
def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "mcp", None)  # as if the extra were not installed
    assert cli_main(["mcp", "--model", str(CHECKPOINT)]) == 1
    assert capsys.readouterr().err.strip().endswith('pip install "mcp>=2.0,<3"')


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--allowed-dir", "/no/such/folder"], "--allowed-dir '/no/such/folder' is not a folder"),
        (["--output-dir", str(CHECKPOINT / "model_index.json")], "exists and is not a folder"),
    ],
)
def test_bad_folders_are_refused_before_loading(
    arguments: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["mcp", "--model", str(CHECKPOINT), *arguments]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_modes_this_machine_cannot_run_are_refused_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["mcp", "--model", str(CHECKPOINT), "--quantize", "nf4"]) == 2
    assert "--quantize nf4 needs a CUDA GPU" in capsys.readouterr().err
    assert cli_main(["mcp", "--model", str(CHECKPOINT), "--offload", "group"]) == 2
    assert "--offload" in capsys.readouterr().err


def test_quantize_and_offload_choices_come_from_the_core() -> None:
    from internvl_u_core import offload, quantization
    from internvl_u_core.cli import build_parser

    mcp = build_parser()._subparsers._group_actions[0].choices["mcp"]
    actions = {a.dest: a for a in mcp._actions}
    assert tuple(actions["quantize"].choices) == quantization.MODES
    assert tuple(actions["offload"].choices) == offload.MODES


def test_the_server_imports_no_other_adapter() -> None:
    probe = (
        "import sys, internvl_u_serve.mcp.server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('agent_tools', 'nodes', 'langchain_core')))"
    )
    found = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **server_env()},
                           capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
