"""Runs model jobs one at a time in a worker thread, reporting progress and honouring cancellation."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from internvl_u_core import GenerationCancelled

logger = logging.getLogger(__name__)

T = TypeVar("T")
ReportProgress = Callable[[float, float, str], Awaitable[None]]
"""`Context.report_progress(progress, total, message)` of the MCP request a job serves."""


class StepReporter:
    """Handed to a job running in a worker thread; the core's step callbacks call it.

    Each call sends one progress notification to the client and returns whether the job
    should go on: `False` once the client cancelled its request, which makes the core stop
    at that step with `GenerationCancelled`.
    """

    def __init__(self, report: ReportProgress) -> None:
        self._report = report
        self._cancelled = anyio.get_cancelled_exc_class()  # made in the event loop; the thread cannot ask

    def __call__(self, stage: str, done: int, total: int) -> bool:
        try:
            anyio.from_thread.check_cancelled()
            anyio.from_thread.run(self._report, done, total, f"{stage} {done}/{total}")
        except self._cancelled:
            return False
        return True


class JobRunner:
    """Serialises jobs on one model: a job waits for the previous one to finish.

    The job runs in a worker thread so the event loop keeps serving other requests
    (listing tools, progress, cancellations). A cancelled request stops its job at the next
    step; the model is free again only once that job has really ended.
    """

    def __init__(self) -> None:
        self._lock = anyio.Lock()

    async def run(self, job: Callable[[StepReporter], T], report: ReportProgress) -> T:
        """Run `job(reporter)` once no other job holds the model, and return its result."""
        async with self._lock:
            try:
                return await anyio.to_thread.run_sync(job, StepReporter(report))
            except GenerationCancelled as stop:
                logger.info("InternVL-U job cancelled by the client: %s", stop)
                await anyio.lowlevel.checkpoint()  # raises the request's cancellation
                raise
