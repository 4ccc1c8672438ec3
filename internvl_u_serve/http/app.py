"""The Starlette application: routes, API key, body limits, image inputs, disconnects, SSE.

Starlette (not FastAPI): the routes are few and every field is checked by the core's own
validation, so a second schema layer would only add a dependency and reshape errors (FastAPI
answers bad fields with 422 in its own format, where OpenAI clients expect 400 with ``param``).
Starlette is also already a dependency of the MCP server's SDK, so ``[serve]`` adds little.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from internvl_u_core import GenerationCancelled, InternVLUError

from . import protocol
from .engine import Engine, Job, QueueFull, ShuttingDown, TextResult
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


class OpenAIServer:
    """Request handling around one :class:`Engine`."""

    def __init__(self, engine: Engine, settings: ServerSettings, *, api_key: str | None = None,
                 max_body_bytes: int = 64 * 1024 * 1024):
        self.engine = engine
        self.settings = settings
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.started = int(time.time())

    @property
    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.protected(self.models), methods=["GET"]),
            Route("/v1/chat/completions", self.protected(self.chat), methods=["POST"]),
            Route("/v1/images/generations", self.protected(self.generations), methods=["POST"]),
            Route("/v1/images/edits", self.protected(self.edits), methods=["POST"]),
        ]
        handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # -- plain endpoints -------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_name, **self.engine.stats()})

    async def models(self, request: Request) -> Response:
        model = {"id": self.settings.model_name, "object": "model", "created": self.started, "owned_by": "internvl-u"}
        return JSONResponse({"object": "list", "data": [model]})

    def protected(self, endpoint):
        """``--api-key``: every /v1 route needs ``Authorization: Bearer <key>``."""
        async def guarded(request: Request) -> Response:
            if self.api_key is not None:
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await endpoint(request)

        return guarded

    # -- chat completions ------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = _json(await self.read_body(request))
        chat = protocol.parse_chat(body, self.settings)
        chat.work.images = await self.load_urls(chat.image_urls)
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
                sent = ""
                while (event := await job.events.get()) is not None:
                    # One chunk per generated token; an incomplete UTF-8 character waits for the next one.
                    text = event[2].rstrip("\ufffd")
                    delta = text[len(sent):] if text.startswith(sent) else ""
                    sent += delta
                    yield chunk({"content": delta})
                try:
                    result: TextResult = await job.future
                except Exception as exc:  # noqa: BLE001 - reported in the stream, as OpenAI does
                    yield _sse(self.error_for(exc, CHAT_FIELDS, "messages").body())
                    yield "data: [DONE]\n\n"
                    return
                # What the last token's text held back (an undecodable byte) rides on the final chunk.
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
        body = _json(await self.read_body(request))
        if not isinstance(body, dict):
            raise bad_request(None, "the request body must be a JSON object")
        return await self.images(request, Fields(body), [], edit=False)

    async def edits(self, request: Request) -> Response:
        body = await self.read_body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request(None, "send /v1/images/edits as multipart/form-data with one or more 'image' files")

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
            images = []
            for i, upload in enumerate(uploads):
                name = "image" if len(uploads) == 1 else f"image[{i}]"
                data = await upload.read()
                images.append(await run_in_threadpool(protocol.decode_image, data, name, self.settings.limits))
            images += await self.load_urls([(f"url[{i}]" if len(urls) > 1 else "url", url) for i, url in enumerate(urls)])
        finally:
            await form.close()
        return await self.images(request, Fields(fields, form=True), images, edit=True)

    async def images(self, request: Request, fields: Fields, images, *, edit: bool) -> Response:
        parsed = protocol.parse_images(fields, self.settings, images, edit=edit)
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
                while (update := await job.events.get()) is not None:
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

    async def load_urls(self, urls: list[tuple[str, str]]):
        """``data:`` URIs (and http(s) URLs of hosts on ``--allow-image-host`` only) → images."""
        images = []
        for name, url in urls:
            if url.startswith("data:"):
                data = protocol.decode_data_uri(url, name)
            elif url.startswith(("http://", "https://")):
                data = await self.fetch(name, url)
            else:
                raise bad_request(name, f"{name}: expected a data:image/...;base64,... URI")
            images.append(await run_in_threadpool(protocol.decode_image, data, name, self.settings.limits))
        return images

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
        job = Job(work, asyncio.get_running_loop())
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise APIError(429, f"The server is busy ({self.engine.max_queue} requests are waiting); retry later.",
                           code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from exc
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
        if isinstance(exc, GenerationCancelled):
            return APIError(503, "The job was cancelled (the client disconnected or the server is shutting down).",
                            code="cancelled")
        if isinstance(exc, (ValueError, TypeError, InternVLUError)):
            return bad_request(_param_for(str(exc), names, default_param), str(exc))
        logger.error("internal error: %s", exc)
        return APIError(500, "Internal server error; see the server log.", code="internal_error")


class DrainingServer(uvicorn.Server):
    """uvicorn's server; a stop signal also refuses the queued jobs (503) and, after ``grace``
    seconds, cancels the running ones (503 too), so every client gets an answer."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float):
        super().__init__(config)
        self.engine = engine
        self.grace = grace

    def handle_exit(self, sig, frame) -> None:
        self.engine.drain(self.grace)  # the engine's lock is re-entrant: safe inside a signal handler
        super().handle_exit(sig, frame)


def serve_forever(server: OpenAIServer, *, host: str, port: int, log_level: str = "info",
                  shutdown_timeout: float = 30.0) -> None:
    """Serve until SIGTERM/SIGINT; running requests then get ``shutdown_timeout`` seconds to finish."""
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=shutdown_timeout + 10)  # a backstop: jobs stop first
    # uvicorn raises the stop signal again once it has shut down; for SIGTERM that must not kill
    # the process before the caller has closed the engine (the exit status is then 0).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        DrainingServer(config, server.engine, shutdown_timeout).run()
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


def _timing(result) -> dict[str, str]:
    """``Server-Timing``: the time the job spent in the pipeline (the rest of a round trip is serving)."""
    return {"Server-Timing": f"pipeline;dur={result.seconds * 1000:.1f}"}


def _json(body: bytes):
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(None, f"the request body is not valid JSON ({exc})") from exc


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
