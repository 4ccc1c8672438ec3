"""Progress reports and cancellation between a tool call and the core's callbacks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForToolRun,
    CallbackManagerForToolRun,
)

PROGRESS_EVENT = "internvlu_progress"
"""Name of the LangChain custom event sent while a tool runs (see `astream_events`)."""

_MAX_REPORTS_PER_STAGE = 50
_DELIVERY_TIMEOUT_S = 5.0

ProgressSink = Callable[[dict[str, Any]], None]


class JobControl:
    """Handed to a job: forwards progress and tells the core when to stop.

    The core's step callbacks return `control.progress(...)`; it returns `False`
    once `cancel()` was called, which makes the core raise `GenerationCancelled`.
    """

    def __init__(self, sink: ProgressSink | None = None) -> None:
        self._sink = sink
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        """Whether the caller gave up on this job."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the running job to stop at its next step."""
        self._cancelled.set()

    def progress(self, stage: str, step: int, total: int) -> bool:
        """Report step `step` of `total`; return whether the job should go on."""
        if self._sink is not None and not self.cancelled and _worth_reporting(step, total):
            self._sink({"stage": stage, "step": step, "total": total})
        return not self.cancelled

    def message(self, stage: str, text: str) -> None:
        """Report a free-form status line (e.g. while the model loads)."""
        if self._sink is not None and not self.cancelled:
            self._sink({"stage": stage, "message": text})


def _worth_reporting(step: int, total: int) -> bool:
    stride = max(1, total // _MAX_REPORTS_PER_STAGE)
    return step <= 1 or step >= total or step % stride == 0


def sync_progress_sink(run_manager: CallbackManagerForToolRun | None, tool_name: str) -> ProgressSink | None:
    """Send progress as custom events of the tool's run (sync callbacks)."""
    if run_manager is None:
        return None
    children = run_manager.get_child()
    if not children.handlers:
        return None

    def send(data: dict[str, Any]) -> None:
        children.on_custom_event(PROGRESS_EVENT, {"tool": tool_name, **data}, run_id=run_manager.run_id)

    return send


def async_progress_sink(
    run_manager: AsyncCallbackManagerForToolRun | None,
    tool_name: str,
    loop: asyncio.AbstractEventLoop,
) -> ProgressSink | None:
    """Send progress as custom events from a worker thread to the caller's event loop."""
    if run_manager is None:
        return None
    children = run_manager.get_child()
    if not children.handlers:
        return None

    def send(data: dict[str, Any]) -> None:
        event = children.on_custom_event(PROGRESS_EVENT, {"tool": tool_name, **data}, run_id=run_manager.run_id)
        try:
            delivery = asyncio.run_coroutine_threadsafe(event, loop)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            event.close()
            return
        try:
            delivery.result(timeout=_DELIVERY_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            delivery.cancel()

    return send
