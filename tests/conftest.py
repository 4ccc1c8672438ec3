"""Shared fixtures: the tiny checkpoints (loaded once per session) and the reference cases."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_SETS = ("internvlu-tiny", "internvlu-tiny-c")
TINY_CHECKPOINT = FIXTURES / "internvlu-tiny" / "checkpoint"
#: How the core explains a missing GPU, with either torch build: the CPU wheel ("a CPU-only build
#: without CUDA") or a CUDA wheel on a machine without a GPU ("torch 2.x+cu130 (CUDA 13.0) finds no
#: usable GPU"). A regular expression for pytest.raises(match=...).
NO_GPU_REASON = r"(CPU-only build without CUDA|\(CUDA [\d.]+\) finds no usable GPU)"

torch.set_num_threads(min(2, torch.get_num_threads()))


def fixture_cases(mode_filter=None):
    """``(set_name, case)`` pairs from every fixture set, optionally filtered by generation mode."""
    out = []
    for name in FIXTURE_SETS:
        cases = json.loads((FIXTURES / name / "cases.json").read_text())["cases"]
        for case in cases:
            if mode_filter is None or mode_filter(case["generation_mode"]):
                out.append(pytest.param(name, case, id=f"{name}/{case['name']}"))
    return out


def fixture_case_params(mode_filter=None):
    """Like :func:`fixture_cases`, but each param is one ``(set_name, case)`` tuple (for fixture params)."""
    return [pytest.param(tuple(p.values), id=p.id) for p in fixture_cases(mode_filter)]


def load_inputs(set_name: str, value):
    """Case ``image`` nesting with file names → the same nesting with PIL images."""
    if value is None:
        return None
    if isinstance(value, str):
        return Image.open(FIXTURES / set_name / "inputs" / value).convert("RGB")
    return [load_inputs(set_name, v) for v in value]


def call_kwargs(case: dict) -> dict:
    kwargs = dict(case["call_kwargs"])
    if "generator" in kwargs:
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(kwargs["generator"]["seed"])
    return kwargs


def expected_tensors(set_name: str, case: dict) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / set_name / "expected" / case["expected"]["tensors_file"]))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol=1e-4, rtol=1e-4, name=""):
    actual = actual.detach().to(torch.float32).cpu()
    expected = expected.to(torch.float32)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bound = atol + rtol * expected.abs()
    worst = ((actual - expected).abs() - bound).max().item()
    assert worst <= 0, f"{name}: max excess over tolerance {worst:.3g} (max abs diff {(actual - expected).abs().max():.3g})"


_PIPES: dict[str, object] = {}


def get_pipeline(set_name: str):
    from internvl_u_core import InternVLUPipeline

    if set_name not in _PIPES:
        _PIPES[set_name] = InternVLUPipeline.from_pretrained(
            FIXTURES / set_name / "checkpoint", torch_dtype=torch.float32, device="cpu"
        )
    return _PIPES[set_name]


@pytest.fixture(scope="session")
def unreadable_weights(tmp_path_factory) -> Path:
    """The tiny checkpoint with every weight file replaced by garbage: reading any weight fails loudly."""
    root = tmp_path_factory.mktemp("unreadable") / "checkpoint"
    shutil.copytree(TINY_CHECKPOINT, root)
    for weights in root.rglob("*.safetensors"):
        weights.write_bytes(b"not weights")
    return root


@pytest.fixture(scope="session", autouse=True)
def _no_clone_parent_on_the_path():
    """Take the folder holding this clone off sys.path before any test runs.

    The repository root is a package (ComfyUI's entry ``__init__.py``), so pytest imports it with its
    parent folder on sys.path. A sibling there named like a ComfyUI module (say a ComfyUI checkout
    called ``comfy``) would then be imported as ComfyUI itself; the tests that need ComfyUI put it on
    the path themselves.
    """
    parent = str(Path(__file__).resolve().parents[2])
    sys.path[:] = [entry for entry in sys.path if entry != parent]


@pytest.fixture(scope="session")
def tiny_pipe():
    return get_pipeline("internvlu-tiny")


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is several times faster than two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pipe_without_loras():
    """The tiny pipeline; whatever LoRA adapters the test loaded are removed afterwards."""
    pipe = get_pipeline("internvlu-tiny")
    yield pipe
    if len(pipe.loras):
        pipe.remove_lora()


@pytest.fixture(scope="session")
def tiny_c_pipe():
    return get_pipeline("internvlu-tiny-c")


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One real ``internvl-u serve`` on the tiny checkpoint, wanting the key ``served.api_key``: the server
    behind the nodes', tools' and MCP server's remote tests (started on first use)."""
    from serving import ServerProcess

    server = ServerProcess(tmp_path_factory.mktemp("served") / "server.log", api_key="adapters-test-key").start()
    yield server
    assert server.stop() == 0, server.log_tail()
