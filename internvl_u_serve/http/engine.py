"""One model, one worker thread, a bounded queue: jobs in, results (and progress events) out.

The event loop submits :class:`Job` objects and awaits their futures; the worker thread runs them
through the pipeline's public methods. Draws that can share a denoising pass (same kind, size,
steps and scales, one image each) run together through ``pipe.generate_batch``, which gives every
job the pixels it would get alone. A job whose client has gone is dropped from the queue, or
stopped at its next step (a batch stops when all of its jobs are cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from internvl_u_core import GenerationCancelled, Reasoning
from internvl_u_core.files import png_bytes

logger = logging.getLogger("internvl_u_serve.http")


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server stopped taking jobs (SIGTERM)."""


@dataclass
class TextWork:
    """``understand`` (an answer) or ``reason`` (the chain-of-thought that precedes drawing)."""

    task: str  # "understand" | "reason"
    prompt: str
    images: list[Image.Image]
    system_prompt: str | None
    sampling: dict  # max_new_tokens, min_new_tokens, do_sample, temperature, top_p, num_beams, seed
    stream: bool = False

    batch_key = None


@dataclass
class DrawWork:
    """``generate`` (no images) or ``edit``; with ``think`` set, ``reason`` runs first with those settings."""

    prompt: str
    images: list[Image.Image]
    seed: int
    num_images: int
    settings: dict  # generate()'s width, height, steps, all_cfg_scale, part_cfg_scale, timestep_trunc, flow_shift
    system_prompt: str | None = None
    reasoning: Reasoning | None = None
    think: dict | None = None
    previews: int = 0  # partial images to stream (0: progress events only, when streaming)
    stream: bool = False
    loras: tuple[tuple[str, float], ...] | None = None  # adapter files and scales (None: the server's own)

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share a denoising pass; ``None``: this job runs alone."""
        if self.num_images != 1 or self.think is not None:
            return None
        width, height = self.settings.get("width"), self.settings.get("height")
        if self.images:  # a missing side defaults to the first input's: the output sizes must agree
            width = self.images[0].width if width is None else width
            height = self.images[0].height if height is None else height
        settings = tuple(sorted((k, v) for k, v in self.settings.items() if k not in ("width", "height")))
        return bool(self.images), self.reasoning is not None, width, height, self.system_prompt, settings, self.loras


@dataclass
class TextResult:
    text: str
    tokens: int  # new tokens generated
    reasoning: Reasoning | None = None
    seconds: float = 0.0  # time in the pipeline (Server-Timing)


@dataclass
class DrawResult:
    images: list[Image.Image]
    reasoning: Reasoning | None = None  # the chain-of-thought of a think-mode draw
    seconds: float = 0.0  # time in the pipeline, the whole batch's for a batched draw


@dataclass
class Job:
    """A request's work plus the plumbing back to the event loop that waits for it."""

    work: TextWork | DrawWork
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(init=False)
    events: asyncio.Queue | None = field(init=False, default=None)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.future = self.loop.create_future()
        if self.work.stream:
            self.events = asyncio.Queue()

    def emit(self, event: tuple) -> None:
        """Send a progress event to the waiting request (called on the worker thread)."""
        if self.events is not None and not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop has closed
                self.cancelled.set()

    def _settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle():
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
            if self.events is not None:
                self.events.put_nowait(None)  # end of the event stream

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    def finish(self, result: Any) -> None:
        self._settle(result=result)

    def fail(self, error: BaseException) -> None:
        self._settle(error=error)


class Engine:
    """Runs jobs on a pipeline, one pass at a time, on its own thread."""

    def __init__(self, pipe, *, max_queue: int = 64, max_batch: int = 1):
        self.pipe = pipe
        self.max_queue = max_queue
        self.max_batch = max_batch
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._lock = threading.Condition(threading.RLock())
        self._closing = False
        self._grace_timer: threading.Timer | None = None
        self._seconds_per_pass = 10.0  # running estimate, for Retry-After
        self.passes = 0  # model passes run (a batch counts once), for /health
        self.cancelled = 0  # jobs dropped or stopped because their client went away
        self._thread = threading.Thread(target=self._work, name="internvl-u-engine", daemon=True)
        self._thread.start()

    # -- event-loop side -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                waits = (len(self._queue) + len(self._running)) / max(self.max_batch, 1)
                raise QueueFull(max(1, math.ceil(waits * self._seconds_per_pass)))
            self._queue.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job if it waits, stop it at its next step if it runs."""
        job.cancelled.set()
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
                self.cancelled += 1
                job.fail(GenerationCancelled("the client disconnected"))

    def drain(self, grace: float | None = None) -> None:
        """Stop taking jobs and refuse the waiting ones; running jobs get ``grace`` seconds, then are cancelled."""
        with self._lock:
            self._closing = True
            while self._queue:
                self._queue.popleft().fail(ShuttingDown("the server is shutting down"))
            self._lock.notify_all()
            if grace is not None and self._grace_timer is None:
                self._grace_timer = threading.Timer(grace, self._cancel_running)
                self._grace_timer.daemon = True
                self._grace_timer.start()

    def close(self, timeout: float = 10.0) -> None:
        """Drain, cancel what runs, and wait for the worker thread."""
        self.drain()
        self._cancel_running()
        self._thread.join(timeout)

    def _cancel_running(self) -> None:
        with self._lock:
            for job in self._running:
                job.cancelled.set()

    def stats(self) -> dict:
        with self._lock:
            return {"waiting": len(self._queue), "running": len(self._running), "passes": self.passes,
                    "cancelled": self.cancelled}

    # -- worker side -----------------------------------------------------------------------------
    def _next_group(self) -> list[Job] | None:
        with self._lock:
            while not self._queue and not self._closing:
                self._lock.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            group = [first]
            key = first.work.batch_key
            if key is not None and self.max_batch > 1:
                for job in list(self._queue):
                    if len(group) >= self.max_batch:
                        break
                    if job.work.batch_key == key:
                        self._queue.remove(job)
                        group.append(job)
            self._running = group
            return group

    def _work(self) -> None:
        while (group := self._next_group()) is not None:
            started = time.perf_counter()
            try:
                if len(group) == 1:
                    self._run_one(group[0])
                else:
                    self._run_batch(group)
            finally:
                elapsed = time.perf_counter() - started
                self._seconds_per_pass = 0.8 * self._seconds_per_pass + 0.2 * elapsed
                with self._lock:
                    self._running = []
                    self.passes += 1

    def _run_one(self, job: Job) -> None:
        try:
            work = job.work
            started = time.perf_counter()
            result = self._text(job, work) if isinstance(work, TextWork) else self._draw(job, work)
            result.seconds = time.perf_counter() - started
        except BaseException as exc:  # handed to the request, which answers with the right status
            if not isinstance(exc, (GenerationCancelled, ValueError, TypeError)):
                logger.exception("job failed")
            if isinstance(exc, GenerationCancelled) and job.cancelled.is_set():
                self._count_cancelled(1)
            job.fail(exc)
        else:
            job.finish(result)

    def _run_batch(self, jobs: list[Job]) -> None:
        works: list[DrawWork] = [job.work for job in jobs]
        first = works[0]

        def callback(step, total, latents):
            if all(job.cancelled.is_set() for job in jobs):
                return False
            for row, job in enumerate(jobs):
                self._progress(job, step, total, latents[row : row + 1])
            return None

        started = time.perf_counter()
        try:
            with self._loras(first.loras):
                pictures = self.pipe.generate_batch(
                    [w.prompt for w in works], [w.seed for w in works],
                    images=[w.images for w in works] if first.images else None,
                    reasonings=[w.reasoning for w in works] if first.reasoning is not None else None,
                    system_prompt=first.system_prompt, callback=callback, **first.settings,
                )
        except BaseException as exc:
            if not isinstance(exc, (GenerationCancelled, ValueError, TypeError)):
                logger.exception("batch failed")
            if isinstance(exc, GenerationCancelled):
                self._count_cancelled(len(jobs))
            for job in jobs:
                job.fail(exc)
            return
        for job, picture in zip(jobs, pictures):
            if job.cancelled.is_set():
                self._count_cancelled(1)
                job.fail(GenerationCancelled("the client disconnected"))
            else:
                job.finish(DrawResult([picture], seconds=time.perf_counter() - started))

    def _count_cancelled(self, count: int) -> None:
        with self._lock:
            self.cancelled += count

    def _text(self, job: Job, work: TextWork) -> TextResult:
        generated = 0

        def count_tokens(step, total):
            nonlocal generated
            generated = step
            return False if job.cancelled.is_set() else None

        def stream_text(text):
            job.emit(("text", generated, text))

        common = dict(
            system_prompt=work.system_prompt, token_callback=count_tokens,
            text_callback=stream_text if work.stream else None, **work.sampling,
        )
        if work.task == "reason":
            reasoning = self.pipe.reason(work.prompt, work.images or None, **common)
            return TextResult(reasoning.text, len(reasoning.token_ids), reasoning)
        answer = self.pipe.understand(work.images or None, work.prompt, **common)
        return TextResult(answer, generated)

    def _draw(self, job: Job, work: DrawWork) -> DrawResult:
        reasoning = work.reasoning
        thought = None
        if work.think is not None:
            def keep_thinking(step, total):
                return False if job.cancelled.is_set() else None

            reasoning = thought = self.pipe.reason(
                work.prompt, work.images or None, system_prompt=work.system_prompt, token_callback=keep_thinking,
                **work.think,
            )

        def callback(step, total, latents):
            if job.cancelled.is_set():
                return False
            self._progress(job, step, total, latents)
            return None

        common = dict(
            seed=work.seed, num_images=work.num_images, reasoning=reasoning, system_prompt=work.system_prompt,
            callback=callback, **work.settings,
        )
        with self._loras(work.loras):
            if work.images:
                pictures = self.pipe.edit(work.images, work.prompt, **common)
            else:
                pictures = self.pipe.generate(work.prompt, **common)
        return DrawResult(pictures, thought)

    @contextlib.contextmanager
    def _loras(self, chosen: tuple[tuple[str, float], ...] | None):
        """A request's adapters on for its draw; afterwards the server's own (``--lora``) again."""
        if chosen is None:
            yield
            return
        own = self.pipe.loras.describe()
        self.pipe.loras.activate_files(chosen)
        try:
            yield
        finally:
            self.pipe.set_loras(own)

    def _progress(self, job: Job, step: int, total: int, latents) -> None:
        work = job.work
        if not work.stream or job.cancelled.is_set():
            return
        preview = None
        if work.previews and step in preview_steps(total, work.previews):
            preview = png_bytes(self.pipe.decode_latents_preview(latents))
        job.emit(("step", step, total, preview))


def preview_steps(total: int, count: int) -> set[int]:
    """``count`` steps spread evenly over ``1 … total``, the last one included."""
    count = min(count, total)
    return {math.ceil(total * (i + 1) / count) for i in range(count)}
