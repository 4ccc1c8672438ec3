"""Plumbing shared by the InternVL-U tools: validation, queueing, progress, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForToolRun,
    CallbackManagerForToolRun,
)
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ValidationError
from pydantic.v1 import ValidationError as ValidationErrorV1

from agent_tools.content import ToolContent
from agent_tools.progress import JobControl, async_progress_sink, sync_progress_sink
from agent_tools.session import InternVLUSession
from internvl_u_core import InternVLUPipeline, InvalidInputError

ToolOutput = tuple[ToolContent, dict[str, Any]]


def explain_validation_error(error: ValidationError | ValidationErrorV1) -> str:
    """Turn a pydantic error into one line the agent's model can act on."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'arguments'}: {problem['msg']}"
        for problem in error.errors()
    )
    return f"Invalid arguments: {problems}. Fix them and call the tool again."


@contextmanager
def core_input_errors_as_tool_errors() -> Iterator[None]:
    """Report the core's `InvalidInputError` to the agent; let real faults propagate."""
    try:
        yield
    except InvalidInputError as error:
        raise ToolException(f"The model refused the request: {error}") from error


class InternVLUTool(BaseTool):
    """Base of the four tools.

    A call validates its arguments (`args_schema`), prepares its inputs outside the
    model lock (`_prepare`: load images, look up ids, check limits), runs one core job
    while holding the model (`_call_core`), then saves and describes the result
    (`_present`). Subclasses only implement those three steps.
    """

    session: InternVLUSession
    """The shared model, image store and reasoning store."""
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], str] | None = True
    handle_validation_error: bool | str | Callable[[ValidationError | ValidationErrorV1], str] | None = (
        explain_validation_error
    )

    def _prepare(self, request: Any) -> Any:
        raise NotImplementedError

    def _call_core(self, pipeline: InternVLUPipeline, control: JobControl, plan: Any) -> Any:
        raise NotImplementedError

    def _present(self, plan: Any, result: Any) -> ToolOutput:
        raise NotImplementedError

    def _run(self, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any) -> ToolOutput:
        plan = self._prepare(self._request(kwargs))
        control = JobControl(sync_progress_sink(run_manager, self.name))
        with core_input_errors_as_tool_errors():
            result = self.session.runner.run(partial(self._call_core, plan=plan), control)
        return self._present(plan, result)

    async def _arun(self, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any) -> ToolOutput:
        plan = await asyncio.to_thread(self._prepare, self._request(kwargs))
        loop = asyncio.get_running_loop()
        control = JobControl(async_progress_sink(run_manager, self.name, loop))
        with core_input_errors_as_tool_errors():
            result = await self.session.runner.arun(partial(self._call_core, plan=plan), control)
        return await asyncio.to_thread(self._present, plan, result)

    def _request(self, kwargs: dict[str, Any]) -> BaseModel:
        schema = self.args_schema
        assert isinstance(schema, type) and issubclass(schema, BaseModel)
        return schema.model_validate(kwargs)

    def _check_at_most(self, name: str, value: int | None, limit: int) -> None:
        if value is not None and value > limit:
            raise ToolException(f"{name}={value} is above this tool's limit of {limit}.")
