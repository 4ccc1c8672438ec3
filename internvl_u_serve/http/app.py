"""The Starlette application: routes, API key, body limits, image inputs, disconnects, SSE.

Starlette (not FastAPI): the routes are few and every field is checked by the core's own
validation, so a second schema layer would only add a dependency and reshape errors (FastAPI
answers bad fields with 422 in its own format, where OpenAI clients expect 400 with ``param``).
Starlette is also already a dependency of the MCP server's SDK, so ``[serve]`` adds little.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from internvl_u_core import GenerationCancelled, InternVLUError

from . import protocol
from .engine import DrawWork, Engine, Job, QueueFull, ShuttingDown, StreamOverflow, TextResult
from .protocol import APIError, Fields, ServerSettings, bad_request

logger = logging.getLogger("internvl_u_serve.http")

# Core argument names (as they open the core's error messages) → request fields, per endpoint.
CHAT_FIELDS = {
    "question": "messages", "prompt": "messages", "instruction": "messages", "images": "messages",
    "system_prompt": "messages", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
    "height×width": "width", "height": "height", "width": "width", "reasoning": "reasoning",
}
IMAGES_FIELDS = {
    "prompt": "prompt", "instruction": "prompt", "images": "image", "system_prompt": "system_prompt",
    "height×width": "size", "height": "size", "width": "size", "reasoning": "reasoning",
    "max_new_tokens": "max_tokens",
}
SHARED_FIELDS = ("num_inference_steps", "all_cfg_scale", "part_cfg_scale", "timestep_trunc", "flow_shift",
                 "temperature", "top_p", "num_beams", "seed")


#: Routes that answer without the API key (they reveal nothing but whether the server is up).
PUBLIC_PATHS = frozenset({"/health"})
#: What each POST route accepts; other content types get 415 (a browser sends text/plain and form posts
#: from any page without asking first, so accepting them would let any web page run the model).
CONTENT_TYPES = {
    "/v1/chat/completions": "application/json",
    "/v1/images/generations": "application/json",
    "/v1/images/edits": "multipart/form-data",
}
#: Input images decoded at once, server-wide (each decode may briefly hold a few bytes per pixel).
DECODE_WORKERS = 2
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class OpenAIServer:
    """Request handling around one :class:`Engine`.

    A request passes, in order: the Host check and API key (:class:`Guard`, over every route but
    :data:`PUBLIC_PATHS`), its content type, its body size, the queue's room, its fields, each input
    image's header (format and pixel count, before any pixel is decoded), the decoding of its images
    (at most :data:`DECODE_WORKERS` at once), the model's own checks of its content
    (``pipe.check_request``), and then the queue. Everything before the queue that may take time runs
    off the event loop.
    """

    def __init__(self, engine: Engine, settings: ServerSettings, *, api_key: str | None = None,
                 max_body_bytes: int = 64 * 1024 * 1024, allowed_hosts: frozenset[str] | None = None):
        self.engine = engine
        self.settings = settings
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        #: Host headers answered when there is no API key (None: any); see :func:`allowed_hosts_for`.
        self.allowed_hosts = allowed_hosts
        self.started = int(time.time())
        self.decoders = anyio.CapacityLimiter(DECODE_WORKERS)

    @property
    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/images/generations", self.generations, methods=["POST"]),
            Route("/v1/images/edits", self.edits, methods=["POST"]),
        ]
        handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
        return Starlette(routes=routes, exception_handlers=handlers,
                         middleware=[Middleware(Guard, api_key=self.api_key, allowed_hosts=self.allowed_hosts)])

    # -- plain endpoints -------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """Ready (200 ``ok``) or not (503 ``shutting_down``); the model's name and the queue's numbers only
        for a caller with the key (or on a server without one)."""
        ready = self.engine.accepting
        status = {"status": "ok" if ready else "shutting_down"}
        if self.api_key is None or _has_key(request, self.api_key):
            status.update(model=self.settings.model_name, **self.engine.stats())
        return JSONResponse(status, status_code=200 if ready else 503)

    async def models(self, request: Request) -> Response:
        model = {"id": self.settings.model_name, "object": "model", "created": self.started, "owned_by": "internvl-u",
                 "limits": self.limits_shown()}
        return JSONResponse({"object": "list", "data": [model]})

    def limits_shown(self) -> dict:
        """The bounds every request is checked against (``--max-*`` flags), and the memory one admitted
        request may hold: its body plus its decoded input images."""
        limits = self.settings.limits.describe()
        per_request = self.max_body_bytes + limits["max_images_per_prompt"] * limits["max_input_pixels"] * 3
        return {**limits, "max_body_bytes": self.max_body_bytes, "max_request_memory_bytes": per_request,
                "max_queue": self.engine.max_queue, "stream_buffer_bytes": self.settings.stream_buffer_bytes}

    # -- chat completions ------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await self.json_body(request)
        chat = await run_in_threadpool(_parsed, protocol.parse_chat, body, self.settings)
        images = await self.load_urls(chat.image_urls)
        if isinstance(chat.work, DrawWork):
            chat.work = dataclasses.replace(chat.work, request=dataclasses.replace(chat.work.request,
                                                                                  images=tuple(images)))
        else:
            chat.work.images = images
        await self.admit(chat.work, CHAT_FIELDS, "messages")
        if chat.stream:
            return self.stream_chat(chat)
        result = await self.run(request, chat.work, CHAT_FIELDS, "messages")
        response = await run_in_threadpool(protocol.chat_response, chat, result, self.settings.model_name)
        return JSONResponse(response, headers=_timing(result))

    def stream_chat(self, chat: protocol.ChatRequest) -> Response:
        job = self.submit(chat.work)
        chunk_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.settings.model_name

        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse(protocol.chat_chunk(chunk_id, created, model, delta, finish))

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                sent = []
                while (event := job.take(await job.events.get())) is not None:
                    # One chunk per generated token (the new text; "" while a character is split).
                    sent.append(event[2])
                    yield chunk({"content": event[2]})
                try:
                    result: TextResult = await job.future
                except Exception as exc:  # noqa: BLE001 - reported in the stream, as OpenAI does
                    yield _sse(self.error_for(exc, CHAT_FIELDS, "messages").body())
                    yield "data: [DONE]\n\n"
                    return
                # What the last token's text held back (an undecodable byte) rides on the final chunk.
                sent = "".join(sent)
                rest = result.text[len(sent):] if result.text.startswith(sent) else ""
                final = protocol.chat_chunk(chunk_id, created, model, {"content": rest} if rest else {},
                                            protocol.finish_reason(result, chat.work.sampling["max_new_tokens"]))
                final.update(protocol.reasoning_fields(result.reasoning))
                yield _sse(final)
                yield "data: [DONE]\n\n"
            finally:
                if not job.future.done():
                    self.engine.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- images API ------------------------------------------------------------------------------
    async def generations(self, request: Request) -> Response:
        body = await self.json_body(request)
        if not isinstance(body, dict):
            raise bad_request(None, "the request body must be a JSON object")
        return await self.images(request, Fields(body), [], edit=False)

    async def edits(self, request: Request) -> Response:
        body = await self.read_body(request)
        self.check_room()

        async def once():
            yield body

        parser = MultiPartParser(request.headers, once(), max_files=self.settings.limits.max_images_per_prompt,
                                 max_fields=100, max_part_size=self.max_body_bytes)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise bad_request(None, f"the multipart body cannot be read: {exc.message}") from exc
        try:
            uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
            # vLLM-Omni's url / url[] fields: data: URIs (or URLs of --allow-image-host hosts), after the files.
            urls = [v for k, v in form.multi_items() if k in ("url", "url[]") and isinstance(v, str)]
            fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile) and k not in ("url", "url[]")}
            count = len(uploads) + len(urls)
            if not count:
                raise bad_request("image", "image: at least one image file (or url) is needed")
            if count > self.settings.limits.max_images_per_prompt:
                raise bad_request("image", f"image: at most {self.settings.limits.max_images_per_prompt} images")
            opened = []
            for i, upload in enumerate(uploads):
                name = "image" if len(uploads) == 1 else f"image[{i}]"
                opened.append((name, await self.header(await upload.read(), name)))
            opened += await self.open_urls([(f"url[{i}]" if len(urls) > 1 else "url", url) for i, url in enumerate(urls)])
            images = await self.decode(opened)
        finally:
            await form.close()
        return await self.images(request, Fields(fields, form=True), images, edit=True)

    async def images(self, request: Request, fields: Fields, images, *, edit: bool) -> Response:
        parsed = await run_in_threadpool(_parsed, protocol.parse_images, fields, self.settings, images, edit=edit)
        await self.admit(parsed.work, IMAGES_FIELDS, "prompt")
        if parsed.stream:
            return self.stream_images(parsed)
        result = await self.run(request, parsed.work, IMAGES_FIELDS, "prompt")
        return JSONResponse(await run_in_threadpool(protocol.images_response, result, parsed), headers=_timing(result))

    def stream_images(self, parsed: protocol.ImagesRequest) -> Response:
        """OpenAI's image stream: ``…partial_image`` previews, ``…progress`` steps, one ``…completed`` per image."""
        job = self.submit(parsed.work)
        prefix = "image_edit" if parsed.edit else "image_generation"

        def event(kind: str, payload: dict) -> str:
            payload = {"type": f"{prefix}.{kind}", "created_at": int(time.time()), **payload}
            return f"event: {payload['type']}\n" + _sse(payload)

        async def events():
            try:
                index = 0
                while (update := job.take(await job.events.get())) is not None:
                    _, step, total, preview = update
                    if preview is None:
                        yield event("progress", {"step": step, "total_steps": total})
                    else:
                        yield event("partial_image", {"step": step, "total_steps": total, "partial_image_index": index,
                                                      "b64_json": protocol.b64(preview), "output_format": "png"})
                        index += 1
                try:
                    result = await job.future
                except Exception as exc:  # noqa: BLE001 - reported in the stream
                    yield "event: error\n" + _sse(self.error_for(exc, IMAGES_FIELDS, "prompt").body())
                    return
                extra = protocol.reasoning_fields(result.reasoning)
                for i, image in enumerate(result.images):
                    data = await run_in_threadpool(protocol.encode, image, parsed.output_format, parsed.quality)
                    yield event("completed", {"index": i, "b64_json": protocol.b64(data),
                                              "output_format": parsed.output_format,
                                              "size": f"{image.width}x{image.height}", **extra})
            finally:
                if not job.future.done():
                    self.engine.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- plumbing --------------------------------------------------------------------------------
    async def read_body(self, request: Request) -> bytes:
        """The whole body, refused with 413 as soon as it is known to be too large."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        return await _read_limited(request.stream(), limit)

    async def json_body(self, request: Request):
        """The body (size-checked), the queue's room, then the JSON parsed off the event loop."""
        body = await self.read_body(request)
        self.check_room()
        return await run_in_threadpool(protocol.parse_json, body)

    def check_room(self) -> None:
        """429 (or 503) before any work is spent on a request that could not be queued."""
        try:
            self.engine.check_room()
        except QueueFull as exc:
            raise _busy(self.engine, exc) from exc
        except ShuttingDown as exc:
            raise _shutting_down() from exc

    async def load_urls(self, urls: list[tuple[str, str]]):
        """``data:`` URIs (and http(s) URLs of hosts on ``--allow-image-host`` only) → RGB images."""
        return await self.decode(await self.open_urls(urls))

    async def open_urls(self, urls: list[tuple[str, str]]) -> list[tuple[str, Image.Image]]:
        """Each URL's bytes, opened and checked from the header only; no pixel is decoded yet."""
        opened = []
        for name, url in urls:
            if url.startswith("data:"):
                data = await anyio.to_thread.run_sync(protocol.decode_data_uri, url, name, limiter=self.decoders)
            elif url.startswith(("http://", "https://")):
                data = await self.fetch(name, url)
            else:
                raise bad_request(name, f"{name}: expected a data:image/...;base64,... URI")
            opened.append((name, await self.header(data, name)))
        return opened

    async def header(self, data: bytes, name: str) -> Image.Image:
        return await anyio.to_thread.run_sync(protocol.image_header, data, name, self.settings.limits,
                                              limiter=self.decoders)

    async def decode(self, opened: list[tuple[str, Image.Image]]) -> list[Image.Image]:
        """Decode header-checked images, at most :data:`DECODE_WORKERS` at once server-wide."""
        return [await anyio.to_thread.run_sync(protocol.decode_image, image, name, limiter=self.decoders)
                for name, image in opened]

    async def admit(self, work, names: dict[str, str], default_param: str) -> None:
        """The model's own checks of this request's content, before it may share a batch with others."""
        try:
            await run_in_threadpool(self.engine.admit, work)
        except Exception as exc:
            raise self.error_for(exc, names, default_param) from exc

    async def fetch(self, name: str, url: str) -> bytes:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if host not in self.settings.allowed_image_hosts or parts.username or parts.password:
            raise bad_request(
                name,
                f"{name}: image URLs are not fetched (host {host!r} is not allowed); send the image as a "
                "data:image/...;base64,... URI, or start the server with --allow-image-host HOST",
            )
        import httpx

        limit = min(self.max_body_bytes, self.settings.max_image_bytes)
        try:
            async with httpx.AsyncClient(follow_redirects=False, timeout=30.0) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise bad_request(name, f"{name}: {url} answered HTTP {response.status_code}")
                    return await _read_limited(response.aiter_bytes(), limit)
        except httpx.HTTPError as exc:
            raise bad_request(name, f"{name}: cannot fetch {url} ({exc})") from exc

    def submit(self, work) -> Job:
        job = Job(work, asyncio.get_running_loop(), self.settings.stream_buffer_bytes)
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise _busy(self.engine, exc) from exc
        except ShuttingDown as exc:
            raise _shutting_down() from exc
        return job

    async def run(self, request: Request, work, names: dict[str, str], default_param: str):
        """Queue the work and wait for it; a client that disconnects cancels it."""
        job = self.submit(work)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job, self.engine))
        try:
            return await job.future
        except Exception as exc:
            raise self.error_for(exc, names, default_param) from exc
        finally:
            watcher.cancel()
            if not job.future.done():
                self.engine.cancel(job)

    def error_for(self, exc: BaseException, names: dict[str, str], default_param: str) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, ShuttingDown):
            return _shutting_down()
        if isinstance(exc, StreamOverflow):
            return APIError(408, f"The stream was cut off: {exc}.", code="stream_overflow")
        if isinstance(exc, GenerationCancelled):
            return APIError(503, "The job was cancelled (the client disconnected or the server is shutting down).",
                            code="cancelled")
        if isinstance(exc, (ValueError, TypeError, InternVLUError)):
            return bad_request(_param_for(str(exc), names, default_param), str(exc))
        logger.error("internal error: %s", exc)
        return APIError(500, "Internal server error; see the server log.", code="internal_error")


class Guard:
    """ASGI middleware over every route: the Host check, the API key and each route's content type.

    As middleware (not a wrapper per route) a route added later is guarded too; only
    :data:`PUBLIC_PATHS` answer without the key.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, allowed_hosts: frozenset[str] | None):
        self.app = app
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope, Headers(scope=scope))
            if refusal is not None:
                response = JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope, headers: Headers) -> APIError | None:
        path = scope.get("path", "")
        if self.api_key is None and self.allowed_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                return APIError(421, f"This server does not answer for the host {protocol.shown(host)}; without "
                                     "--api-key it answers only its own address and localhost (add names with "
                                     "--allow-host).", code="host_not_allowed")
        if self.api_key is not None and path not in PUBLIC_PATHS and not _has_key(headers, self.api_key):
            return APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        expected = CONTENT_TYPES.get(path)
        if expected is not None and scope.get("method") == "POST":
            given = headers.get("content-type", "").split(";")[0].strip().lower()
            if given != expected:
                return APIError(415, f"{path} takes {expected}, not {protocol.shown(given or 'no content type')}.",
                                code="unsupported_media_type")
        return None


def allowed_hosts_for(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The Host names a server without a key answers: localhost, the bound address, and ``extra``."""
    names = set(LOCAL_HOSTS) | {name.lower().strip("[]") for name in extra}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host.lower().strip("[]"))
    return frozenset(names)


def _host_name(host: str) -> str:
    """The name in a Host header, without its port (``[::1]:8091`` → ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _has_key(source: Request | Headers, api_key: str) -> bool:
    headers = source.headers if isinstance(source, Request) else source
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class DrainingServer(uvicorn.Server):
    """uvicorn's server; a stop signal also refuses the queued jobs (503) and, after ``grace``
    seconds, cancels the running ones (503 too), so every client gets an answer."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float):
        super().__init__(config)
        self.engine = engine
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        # A signal handler may interrupt any line of any lock-holding code: it only asks the event
        # loop to drain, which then runs like any other callback.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.engine.drain, self.grace)
        else:
            self.engine.drain(self.grace)
        super().handle_exit(sig, frame)


class AddressUnavailable(Exception):
    """The host and port cannot be listened on; the message says why, in one line."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, made before the model loads so that a taken port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressUnavailable(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise AddressUnavailable(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or "
                                 "stop the process that uses it") from None
    return sock


def serve_forever(server: OpenAIServer, *, host: str, port: int, log_level: str = "info",
                  shutdown_timeout: float = 30.0, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM/SIGINT; running requests then get ``shutdown_timeout`` seconds to finish."""
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=shutdown_timeout + 10)  # a backstop: jobs stop first
    # uvicorn raises the stop signal again once it has shut down; for SIGTERM that must not kill
    # the process before the caller has closed the engine (the exit status is then 0).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        DrainingServer(config, server.engine, shutdown_timeout).run(sockets=[sock] if sock is not None else None)
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _cancel_on_disconnect(request: Request, job: Job, engine: Engine) -> None:
    """After the body, the next ASGI message is the client's disconnect (or nothing).

    A ``receive`` that fails means the client can no longer be reached (Ray Serve's proxy has
    dropped a request whose client hung up): that is a disconnect too.
    """
    while True:
        try:
            message = await request.receive()
        except Exception:  # noqa: BLE001 - any failure to reach the client ends its job
            message = {"type": "http.disconnect"}
        if message["type"] == "http.disconnect":
            engine.cancel(job)
            return


def _param_for(message: str, names: dict[str, str], default: str) -> str:
    """The request field behind a core error message, which opens with the argument's name."""
    for name in sorted([*names, *SHARED_FIELDS], key=len, reverse=True):
        if message.startswith(name) and (len(message) == len(name) or not message[len(name)].isalnum()):
            return names.get(name, name)
    return default


def _parsed(parse, *args, **kwargs):
    """``parse(...)``; a field of a shape no check foresaw still gets a 400 (logged: a check is missing)."""
    try:
        return parse(*args, **kwargs)
    except (TypeError, ValueError, RecursionError) as exc:
        logger.warning("a request's fields were refused by %s", type(exc).__name__, exc_info=True)
        raise bad_request(None, "a field of the request has a value of the wrong type or shape; see the API "
                                "reference for each field's type") from exc


def _busy(engine: Engine, exc: QueueFull) -> APIError:
    return APIError(429, f"The server is busy ({engine.max_queue} requests are waiting); retry later.",
                    code="queue_full", headers={"Retry-After": str(exc.retry_after)})


def _timing(result) -> dict[str, str]:
    """``Server-Timing``: the time the job spent in the pipeline (the rest of a round trip is serving)."""
    return {"Server-Timing": f"pipeline;dur={result.seconds * 1000:.1f}"}


async def _read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """All of ``chunks``, refused with 413 as soon as they pass ``limit`` bytes."""
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request is larger than the {limit:,}-byte limit (--max-body-mb).",
                    code="request_too_large")


def _shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", code="shutting_down")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"No route {request.url.path}.", 405: f"{request.method} is not allowed on {request.url.path}."}
    error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code="not_found"
                     if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error")
    return JSONResponse(APIError(500, "Internal server error; see the server log.").body(), status_code=500)
