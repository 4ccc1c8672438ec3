"""LangChain's standard tool tests for the four InternVL-U tools, on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from agent_tools import (
    EditImageTool,
    GenerateImageTool,
    InternVLUSession,
    ReasonTool,
    UnderstandImageTool,
)
from internvl_u_core import InternVLUPipeline

FIXTURE = Path(__file__).parent / "fixtures" / "internvlu-tiny"

# The async standard tests are coroutines; mark them so they run under pytest-asyncio even
# when the project does not set asyncio_mode = "auto" (marking in place keeps them
# identical to the originals, which the no-overrides standard test checks).
for _name in ("test_async_invoke_matches_output_schema", "test_async_invoke_no_tool_call"):
    pytest.mark.asyncio(getattr(ToolsIntegrationTests, _name))

_shared: dict[str, InternVLUSession] = {}


@pytest.fixture(scope="module")
def tiny_pipeline() -> InternVLUPipeline:
    return InternVLUPipeline.from_pretrained(FIXTURE / "checkpoint", torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _session(tiny_pipeline: InternVLUPipeline, tmp_path_factory: pytest.TempPathFactory) -> None:
    """One session (one loaded model) for every tool instance the standard tests build."""
    output_dir = tmp_path_factory.mktemp("agent-tools-standard")
    _shared["session"] = InternVLUSession(tiny_pipeline, output_dir, [FIXTURE / "inputs"])


class _ToolUnderTest:
    tool_class: type[BaseTool]
    example: dict[str, Any]

    @property
    def tool_constructor(self) -> type[BaseTool]:
        return self.tool_class

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"session": _shared["session"]}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return self.example


class _Understand(_ToolUnderTest):
    tool_class = UnderstandImageTool
    example = {"images": ["img_fox_80x60.png"], "question": "What animal is this?", "max_new_tokens": 4}


class _Reason(_ToolUnderTest):
    tool_class = ReasonTool
    example = {"prompt": "A fox in the snow under a pine tree", "max_new_tokens": 4}


class _Generate(_ToolUnderTest):
    tool_class = GenerateImageTool
    example = {"prompt": "A red cube on a table", "width": 64, "height": 64, "steps": 2, "seed": 1}


class _Edit(_ToolUnderTest):
    tool_class = EditImageTool
    example = {
        "images": ["img_fox_80x60.png"],
        "instruction": "Make the sky purple",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 1,
    }


class TestUnderstandImageUnit(_Understand, ToolsUnitTests):
    pass


class TestUnderstandImageIntegration(_Understand, ToolsIntegrationTests):
    pass


class TestReasonUnit(_Reason, ToolsUnitTests):
    pass


class TestReasonIntegration(_Reason, ToolsIntegrationTests):
    pass


class TestGenerateImageUnit(_Generate, ToolsUnitTests):
    pass


class TestGenerateImageIntegration(_Generate, ToolsIntegrationTests):
    pass


class TestEditImageUnit(_Edit, ToolsUnitTests):
    pass


class TestEditImageIntegration(_Edit, ToolsIntegrationTests):
    pass
