"""Runs core jobs one at a time on one pipeline, loading it lazily, sync or async."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from agent_tools.progress import JobControl
from internvl_u_core import GenerationCancelled, InternVLUPipeline, RemoteInternVLU

logger = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[InternVLUPipeline, JobControl], T]


class PipelineRunner:
    """Owns one `InternVLUPipeline` (or the path to load it from, or a `RemoteInternVLU`) and serialises its jobs.

    Parallel tool calls queue on a lock, so the model never runs two jobs at once.
    Async callers wait in a dedicated worker thread and never block the event loop;
    cancelling the awaiting task stops the core at its next step.
    """

    def __init__(
        self,
        model: InternVLUPipeline | RemoteInternVLU | str | os.PathLike[str],
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            self._pipeline: InternVLUPipeline | RemoteInternVLU | None = None
            self._source: str | None = os.fspath(model)
        elif isinstance(model, (InternVLUPipeline, RemoteInternVLU)):
            self._pipeline, self._source = model, None
        else:
            msg = f"model must be an InternVLUPipeline, a RemoteInternVLU or a checkpoint path, got {type(model)!r}"
            raise TypeError(msg)
        self._load_kwargs = dict(load_kwargs or {})
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="internvlu-tools")

    @property
    def is_loaded(self) -> bool:
        """Whether the pipeline is in memory."""
        return self._pipeline is not None

    def load(self) -> InternVLUPipeline:
        """Load the pipeline now (it is otherwise loaded by the first job) and return it."""
        with self._lock:
            return self._ensure_loaded(JobControl())

    def run(self, job: Job[T], control: JobControl) -> T:
        """Run `job` in this thread once no other job holds the pipeline."""
        with self._lock:
            if control.cancelled:
                raise GenerationCancelled("cancelled before it started")
            pipeline = self._ensure_loaded(control)
            try:
                return job(pipeline, control)
            except GenerationCancelled as stop:
                logger.info("InternVL-U job cancelled: %s", stop)
                raise

    async def arun(self, job: Job[T], control: JobControl) -> T:
        """Run `job` in the worker thread; cancelling the caller cancels the job."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._worker, self.run, job, control)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            control.cancel()
            future.add_done_callback(_discard_outcome)
            raise

    def _ensure_loaded(self, control: JobControl) -> InternVLUPipeline:
        if self._pipeline is None:
            control.message("loading", f"loading InternVL-U from {self._source}")
            self._pipeline = InternVLUPipeline.from_pretrained(
                self._source,
                progress=lambda text: control.message("loading", text),
                **self._load_kwargs,
            )
        return self._pipeline


def _discard_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a cancelled job ends in GenerationCancelled; nobody awaits it
