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
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from internvl_u_core import GenerationCancelled, Reasoning
from internvl_u_core.draw_request import DrawRequest
from internvl_u_core.files import png_bytes

logger = logging.getLogger("internvl_u_serve.http")


#: Errors that mean "this input cannot run" (answered 400), as opposed to the server failing.
INPUT_ERRORS = (ValueError, TypeError)  # InvalidInputError and InvalidInputTypeError are these


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
    """``generate`` or ``edit`` (``request``); with ``think`` set, ``reason`` runs first with those settings."""

    request: DrawRequest
    think: dict | None = None
    previews: int = 0  # partial images to stream (0: progress events only, when streaming)
    stream: bool = False
    loras: tuple[tuple[str, float], ...] | None = None  # adapter files and scales (None: the server's own)

    @property
    def images(self) -> tuple[Image.Image, ...]:
        return self.request.images

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share a denoising pass; ``None``: this job runs alone."""
        key = None if self.think is not None else self.request.batch_key
        return None if key is None else (key, self.loras)


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


#: Most bytes of events one stream may have waiting for its client; a client that stops reading is cut
#: off (its job cancelled) before its buffer grows past this.
STREAM_BUFFER_BYTES = 8 * 1024 * 1024
EVENT_OVERHEAD_BYTES = 256  # an event's JSON framing, counted with its payload


class StreamOverflow(GenerationCancelled):
    """The client stopped reading its stream and its waiting events passed the buffer bound."""


@dataclass
class Job:
    """A request's work plus the plumbing back to the event loop that waits for it."""

    work: TextWork | DrawWork
    loop: asyncio.AbstractEventLoop
    stream_buffer_bytes: int = STREAM_BUFFER_BYTES
    future: asyncio.Future = field(init=False)
    events: asyncio.Queue | None = field(init=False, default=None)
    cancelled: threading.Event = field(default_factory=threading.Event)
    buffered: int = field(init=False, default=0)  # bytes of events waiting (touched on the event loop only)

    def __post_init__(self):
        self.future = self.loop.create_future()
        if self.work.stream:
            self.events = asyncio.Queue()

    def emit(self, event: tuple, size: int = 0) -> None:
        """Send a progress event of ``size`` payload bytes to the waiting request (called on the worker thread)."""
        if self.events is not None and not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(self._push, event, size + EVENT_OVERHEAD_BYTES)
            except RuntimeError:  # the event loop has closed
                self.cancelled.set()

    def _push(self, event: tuple, size: int) -> None:
        if self.cancelled.is_set():
            return
        if self.buffered + size > self.stream_buffer_bytes:
            self.cut_off()
            return
        self.buffered += size
        self.events.put_nowait((event, size))

    def take(self, item) -> tuple | None:
        """The event of a queue item (``None``: the end), its bytes no longer counted as waiting."""
        if item is None:
            return None
        event, size = item
        self.buffered -= size
        return event

    def cut_off(self) -> None:
        """Stop a stream whose client does not read: cancel the job, drop its waiting events, end the stream."""
        self.cancelled.set()
        while not self.events.empty():
            self.events.get_nowait()
        self.buffered = 0
        if not self.future.done():
            self.future.set_exception(StreamOverflow(
                f"the client read too slowly: more than {self.stream_buffer_bytes:,} bytes of events were waiting"))
        self.events.put_nowait(None)

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
    @property
    def accepting(self) -> bool:
        """Whether jobs are still taken (not after SIGTERM)."""
        return not self._closing

    def check_room(self) -> None:
        """Raise :class:`QueueFull` (or :class:`ShuttingDown`) now, before a request's images are decoded."""
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                waits = (len(self._queue) + len(self._running)) / max(self.max_batch, 1)
                raise QueueFull(max(1, math.ceil(waits * self._seconds_per_pass)))

    def admit(self, work: TextWork | DrawWork) -> None:
        """The checks of ``work``'s own content that the model would make when it runs (call off the event loop).

        Run before queueing, so that a request that cannot run is refused alone instead of failing a
        batch it would have shared with others.
        """
        check = getattr(self.pipe, "check_request", None)
        if check is None:
            return
        if isinstance(work, TextWork):
            check(work.prompt, len(work.images), mode="text" if work.task == "understand" else "text_image",
                  system_prompt=work.system_prompt, max_new_tokens=work.sampling["max_new_tokens"])
            return
        request = work.request
        if work.think is not None:
            check(request.prompt, len(request.images), mode="text_image", system_prompt=request.system_prompt,
                  max_new_tokens=work.think["max_new_tokens"])
        check(request.prompt, len(request.images), reasoning=request.reasoning, system_prompt=request.system_prompt)

    def submit(self, job: Job) -> None:
        with self._lock:
            self.check_room()
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
            if not isinstance(exc, (GenerationCancelled, *INPUT_ERRORS)):
                logger.exception("job failed")
            if isinstance(exc, GenerationCancelled) and job.cancelled.is_set():
                self._count_cancelled(1)
            job.fail(exc)
        else:
            job.finish(result)

    def _run_batch(self, jobs: list[Job]) -> None:
        requests: list[DrawRequest] = [job.work.request for job in jobs]
        first = requests[0]

        def callback(step, total, latents):
            if all(job.cancelled.is_set() for job in jobs):
                return False
            for row, job in enumerate(jobs):
                self._progress(job, step, total, latents[row : row + 1])
            return None

        started = time.perf_counter()
        try:
            with self._loras(jobs[0].work.loras):  # equal batch keys: the same adapters
                pictures = self.pipe.generate_batch(
                    [r.prompt for r in requests], [r.seed for r in requests],
                    images=[list(r.images) for r in requests] if first.images else None,
                    reasonings=[r.reasoning for r in requests] if first.reasoning is not None else None,
                    system_prompt=first.system_prompt, callback=callback, **first.settings(),
                )
        except INPUT_ERRORS:
            # Admission checked each request, so this is unexpected; still, one request's problem must not
            # become the others' answer: each runs again alone and gets its own result or error.
            logger.warning("a batch of %d was refused; running its requests one by one", len(jobs))
            for job in jobs:
                self._run_one(job)
            return
        except BaseException as exc:
            if not isinstance(exc, GenerationCancelled):
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

        sent = last_step = 0

        def stream_text(text):  # the answer so far; only its new part travels (it only ever grows)
            nonlocal sent, last_step
            if work.sampling.get("num_beams", 1) == 1 and generated == last_step:
                return  # the whole answer once more after its last token: the final chunk carries what is new
            last_step = generated
            delta = text[sent:]
            sent = len(text)
            job.emit(("text", generated, delta), len(delta.encode()))

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
        request = work.request
        thought = None
        if work.think is not None:
            def keep_thinking(step, total):
                return False if job.cancelled.is_set() else None

            thought = self.pipe.reason(
                request.prompt, list(request.images) or None, system_prompt=request.system_prompt,
                token_callback=keep_thinking, **work.think,
            )
            request = dataclasses.replace(request, reasoning=thought)

        def callback(step, total, latents):
            if job.cancelled.is_set():
                return False
            self._progress(job, step, total, latents)
            return None

        with self._loras(work.loras):
            return DrawResult(request.run(self.pipe, callback=callback), thought)

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
        job.emit(("step", step, total, preview), len(preview or b"") * 4 // 3)  # sent as base64


def preview_steps(total: int, count: int) -> set[int]:
    """``count`` steps spread evenly over ``1 … total``, the last one included."""
    count = min(count, total)
    return {math.ceil(total * (i + 1) / count) for i in range(count)}
