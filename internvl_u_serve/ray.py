"""``internvl-u serve`` on Ray Serve: the same Starlette app and engine on many replicas.

Each replica is a Ray actor that loads the model once and runs ``internvl-u serve``'s own
:class:`~internvl_u_serve.http.app.OpenAIServer` and :class:`~internvl_u_serve.http.engine.Engine`
behind ``serve.ingress``, so routes, batching, limits and errors are those of one server. Ray adds
what one process cannot: replicas across GPUs and machines, autoscaling on ongoing requests,
restarts of dead replicas and a draining downscale.

Entry points:

* ``serve run internvl_u_serve.ray:app model=/path/to/checkpoint max_batch=4`` and ``serve deploy``
  YAML files (``import_path: internvl_u_serve.ray:app`` with ``args:``): the application args are
  ``internvl-u serve``'s flags without their dashes (``served_model_name``, ``max_queue``,
  ``replicas``, ``autoscale``, ``gpus_per_replica``, …); a list repeats a flag, ``true`` sets a
  switch. Flags in ``$INTERNVL_U_SERVE_ARGS`` (a command line: ``--model /ckpt --max-batch 4``) come
  first, so application args override them; ``--model`` also falls back to ``$INTERNVL_U_MODEL``.
* ``internvl-u serve --ray --replicas 2`` (``internvl_u_serve.http.command``) for one machine.

A replica that dies mid-job cannot answer its requests itself; Ray's HTTP proxy then ends them
without a response (or cuts a stream). :func:`proxy_middlewares`, installed in every proxy through
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, turns that into an OpenAI-shaped 503 with
``Retry-After`` (an ``error`` event in a stream) and gives Ray's own plain-text refusals the same
shape. This module imports nothing heavy at module level: the proxies import it too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import socket
from collections.abc import Mapping

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'Ray Serve is not installed; install the [ray] extra: pip install -e ".[ray]" in your clone, '
        'or pip install "ray[serve]>=2.60,<3"'
    ) from exc

#: The deployment's name (``serve status``, ``deployments:`` in a ``serve deploy`` YAML).
DEPLOYMENT_NAME = "InternVLU"
#: ``internvl-u serve`` flags for the replicas, as one command line (application args override them).
ARGS_ENV = "INTERNVL_U_SERVE_ARGS"
#: Ray reads this in every HTTP proxy (set it before ``ray start``, or before ``ray.init``).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "internvl_u_serve.ray:proxy_middlewares"
#: The response header naming the replica that answered (``InternVLU#<replica id>@<host>``).
REPLICA_HEADER = "x-internvl-u-replica"
#: ``Retry-After`` (seconds) when a replica died under a request: Ray restarts it in about this long.
RETRY_AFTER_REPLICA_LOST = 5

#: Options that place replicas rather than configure one (kept out of the replicas' init args, so
#: changing them scales the deployment instead of restarting every replica).
PLACEMENT_OPTIONS = ("ray", "replicas", "autoscale", "gpus_per_replica", "cpus_per_replica")

logger = logging.getLogger("internvl_u_serve.ray")


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------
def serve_options(args: Mapping | None = None, *, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """``internvl-u serve``'s options from ``$INTERNVL_U_SERVE_ARGS`` then the application ``args``.

    Parsed by the command's own parser, so every flag, default and check is the command's.
    """
    from internvl_u_serve.common import model_problem
    from internvl_u_serve.http.command import register

    env = os.environ if env is None else env
    argv = shlex.split(env.get(ARGS_ENV, "")) + _flags(args or {})
    parser = argparse.ArgumentParser(prog="internvl_u_serve.ray:app", exit_on_error=False)
    register(parser.add_subparsers(dest="command"))
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            options = parser.parse_args(["serve", *argv])
    except (argparse.ArgumentError, SystemExit) as exc:
        lines = complaint.getvalue().strip().splitlines() or [str(exc)]
        raise ValueError(f"internvl_u_serve.ray:app: {lines[-1]} (arguments: {argv})") from exc
    problem = model_problem(options)
    if problem:
        raise ValueError(f"internvl_u_serve.ray:app: {problem} (or pass model=... as an application arg)")
    return options


def _flags(args: Mapping) -> list[str]:
    """``{"max_batch": 4, "think": True, "allow_image_host": ["a", "b"]}`` → ``--max-batch 4 --think …``."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def deployment_options(options: argparse.Namespace) -> dict:
    """Ray Serve's options for the replicas that ``options`` describe.

    A replica takes at most ``max_batch + max_queue`` requests (its engine runs ``max_batch`` and
    queues the rest); each proxy then holds up to ``max_queue`` more and answers 429 with
    ``Retry-After`` past that, like one server whose queue is full. Autoscaling aims at one full
    batch per replica. A replica leaving (downscale, redeploy) stops getting requests and finishes
    the ones it holds within ``--shutdown-timeout`` seconds.
    """
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    per_replica = options.max_batch + options.max_queue
    actor_options: dict = {"num_cpus": options.cpus_per_replica}
    if options.gpus_per_replica:
        actor_options["num_gpus"] = options.gpus_per_replica
    placed: dict = {
        "max_ongoing_requests": per_replica,
        "max_queued_requests": options.max_queue,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=5),
        "ray_actor_options": actor_options,
        "graceful_shutdown_timeout_s": options.shutdown_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    if options.autoscale:
        low, high = (int(side) for side in options.autoscale.split(":"))  # checked by the parser
        placed["autoscaling_config"] = AutoscalingConfig(
            min_replicas=low, max_replicas=high, initial_replicas=max(low, 1),
            target_ongoing_requests=options.max_batch, upscale_delay_s=10, downscale_delay_s=60,
        )
    else:
        placed["num_replicas"] = options.replicas
    return placed


def replica_options(options: argparse.Namespace) -> argparse.Namespace:
    """The options one replica needs (placement removed)."""
    return argparse.Namespace(**{k: v for k, v in vars(options).items() if k not in PLACEMENT_OPTIONS
                                 and k != "handler"})


# ----------------------------------------------------------------------------------------------
# The replica
# ----------------------------------------------------------------------------------------------
@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class InternVLUReplica:
    """One model, one engine, ``internvl-u serve``'s Starlette app (built by Serve after ``__init__``)."""

    def __init__(self, options: argparse.Namespace):
        from internvl_u_core.options import API_KEY_ENV
        from internvl_u_serve.common import load_pipeline
        from internvl_u_serve.http.command import build_server

        if options.api_key is None:  # the replica's environment (a runtime_env) may carry the key
            options.api_key = os.environ.get(API_KEY_ENV) or None
        logging.getLogger("internvl_u_serve").setLevel(options.log_level.upper())
        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_id.unique_id}@{socket.gethostname()}"
        self.engine, self.server = build_server(options, load_pipeline(options, "serve --ray"))
        logger.info("replica %s is ready (pid %d)", self.name, os.getpid())

    def __serve_build_asgi_app__(self):
        return NameReplica(self.server.app, self.name)

    def __del__(self):
        # Serve calls this after the graceful-shutdown wait (every request finished or the timeout hit).
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class NameReplica:
    """ASGI middleware: every HTTP response names the replica that produced it."""

    def __init__(self, app, name: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def build_app(options: argparse.Namespace):
    """The Serve application (``serve.run`` it) for parsed ``internvl-u serve`` options."""
    deployment = InternVLUReplica.options(**deployment_options(options))
    return deployment.bind(replica_options(options))


def app(args: dict | None = None):
    """``serve run internvl_u_serve.ray:app model=… replicas=2`` / ``serve deploy``'s import path.

    ``serve run`` calls this before it starts a local cluster, so that cluster's proxies get the
    503 translation; a cluster started with ``ray start`` needs ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
    exported before it (docs/ray-serve.md).
    """
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    return build_app(serve_options(args))


# ----------------------------------------------------------------------------------------------
# The proxy side: OpenAI-shaped errors when a replica cannot answer
# ----------------------------------------------------------------------------------------------
def proxy_middlewares() -> list:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` points at: the middlewares of every proxy."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrors)]


def error_body(status: int, message: str, code: str | None) -> bytes:
    """OpenAI's error shape (as ``internvl-u serve`` writes it)."""
    kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


_RAY_ERRORS = {429: "queue_full", 408: "timeout", 503: "unavailable", 404: "not_found", 500: "internal_error"}


class OpenAIErrors:
    """ASGI middleware for Ray's HTTP proxy.

    * No response at all (the replica died mid-job, or another Ray failure): 503 with
      ``Retry-After`` and an OpenAI-shaped body, code ``replica_unavailable``.
    * A stream the replica stopped feeding: an OpenAI-shaped ``error`` event, then the end.
    * Ray's own plain-text errors (queue full, timeout, no replica ready): the same status in
      OpenAI's shape; a 503 or 429 always carries ``Retry-After``.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "finished": False, "rewrite": None, "stream": False}

        async def watched(message):
            kind = message["type"]
            if kind == "http.response.start":
                state["started"] = True
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                content_type = headers.get(b"content-type", b"")
                state["stream"] = content_type.startswith(b"text/event-stream")
                if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                    state["rewrite"] = (message["status"], headers, [])
                    return
            elif kind == "http.response.body":
                if state["rewrite"] is not None:
                    state["rewrite"][2].append(message.get("body", b""))
                    if not message.get("more_body", False):
                        state["finished"] = True
                        await self._send_rewritten(send, *state["rewrite"])
                    return
                if not message.get("more_body", False):
                    state["finished"] = True
            await send(message)

        failure = None
        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            failure = exc
        if state["finished"]:
            return
        reason = f" ({type(failure).__name__})" if failure is not None else ""
        message = ("The replica serving this request stopped before answering" + reason
                   + "; Ray is restarting it. Retry the request (with the same seed it gives the same result).")
        if not state["started"]:
            logger.warning("a request got no response from its replica%s: answering 503", reason)
            await self._send(send, 503, error_body(503, message, "replica_unavailable"),
                             [(b"retry-after", str(RETRY_AFTER_REPLICA_LOST).encode())])
        elif state["stream"]:
            body = b"event: error\ndata: " + error_body(503, message, "replica_unavailable") + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": False})
        # A plain response cut after its start cannot be amended: the connection closes unfinished.

    async def _send_rewritten(self, send, status: int, headers: dict, chunks: list[bytes]) -> None:
        text = b"".join(chunks).decode(errors="replace").strip() or f"HTTP {status}"
        code = _RAY_ERRORS.get(status)
        extra = [(b"retry-after", headers[b"retry-after"])] if b"retry-after" in headers else []
        if status in (429, 503) and not extra:
            extra = [(b"retry-after", str(RETRY_AFTER_REPLICA_LOST).encode())]
        await self._send(send, status, error_body(status, text, code), extra)

    @staticmethod
    async def _send(send, status: int, body: bytes, headers: list) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
