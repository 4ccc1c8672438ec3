"""``internvl-u serve``: the command line of the HTTP server.

Registered through the ``internvl_u.commands`` entry-point group; importing this module costs
nothing (Starlette, uvicorn and the model are imported only when the command runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

from internvl_u_core.options import API_KEY_ENV
from internvl_u_serve.common import (
    add_limit_options,
    add_model_options,
    apply_limits,
    load_pipeline,
    model_problem,
    served_name,
)

MISSING_EXTRA = (
    'internvl-u serve: error: the server needs the [serve] extra: pip install -e ".[serve]" in your clone, '
    'or pip install "starlette>=0.40,<2" "uvicorn>=0.30" "python-multipart>=0.0.9" "httpx>=0.27"'
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand to the ``internvl-u`` parser."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (vLLM-Omni's InternVL-U dialect)",
        description=(
            "Serve /v1/chat/completions (text and image modalities), /v1/images/generations, "
            "/v1/images/edits, /v1/models and /health. Binds 127.0.0.1 unless --host says otherwise."
        ),
    )
    add_model_options(parser)
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    net.add_argument("--port", type=_bounded(1, 65535, "a TCP port"), default=8091, help="TCP port (default: 8091)")
    net.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                     help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}, "
                          "else none)")
    net.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="without --api-key, answer requests whose Host header is NAME too; repeat for several "
                          "(default: only the bound address and localhost, against DNS rebinding)")
    net.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the model name clients send and /v1/models lists (default: the hub id, or the "
                          "checkpoint folder's own name)")
    net.add_argument("--max-batch", type=_bounded(1, 64, "a batch size"), default=1,
                     help="draw up to N queued images that share size, steps and scales in one denoising pass; "
                          "each keeps the exact pixels it gets alone (default: 1, no batching)")
    net.add_argument("--max-queue", type=_bounded(1, 100_000, "a queue length"), default=32,
                     help="requests allowed to wait; more are answered 429 with Retry-After (default: 32)")
    net.add_argument("--max-body-mb", type=_bounded(1, 4096, "a size in MiB"), default=64,
                     help="largest request body or upload in MiB; larger ones get 413 (default: 64)")
    net.add_argument("--allow-image-host", action="append", default=[], metavar="HOST",
                     help="fetch http(s) image URLs from this host; repeat for several (default: none, only "
                          "data: URIs are accepted)")
    net.add_argument("--think", action="store_true",
                     help="image requests reason first (chain of thought, returned as cot_output) unless they "
                          "send think=false, like vLLM-Omni's think deployment")
    net.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM, running requests get this long to finish before they are cancelled "
                          "(default: 30)")
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="how much the server logs on stderr: info = start-up and one line per request; warning "
                          "or error = problems only; debug = everything (default: info)")
    add_limit_options(parser)
    add_ray_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until SIGTERM or Ctrl-C."""
    if any(importlib.util.find_spec(name) is None for name in ("starlette", "uvicorn", "multipart")):
        print(MISSING_EXTRA, file=sys.stderr)
        return 1
    problem = model_problem(args)
    if problem:
        print(f"internvl-u serve: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.ray:
        return run_ray(args)
    from .app import serve_forever

    sock = _bound_socket(args)  # before the weights load: a taken port fails in a second
    if sock is None:
        return 2
    try:
        engine, server = build_server(args, load_pipeline(args, "serve"))
        try:
            serve_forever(server, host=args.host, port=args.port, log_level=args.log_level,
                          shutdown_timeout=args.shutdown_timeout, sock=sock)
        finally:
            engine.close()
    finally:
        sock.close()
    return 0


def _bound_socket(args: argparse.Namespace):
    """The listening socket for --host/--port, or None after a one-line error (taken port, unknown host)."""
    from .app import AddressUnavailable, bind

    try:
        return bind(args.host, args.port)
    except AddressUnavailable as exc:
        print(f"internvl-u serve: error: {exc}", file=sys.stderr)
        return None


def build_server(args: argparse.Namespace, pipe):
    """The engine and the OpenAI server the options describe, around a loaded pipeline.

    Shared by ``internvl-u serve`` and each Ray Serve replica (``internvl_u_serve.ray``).
    """
    from .app import OpenAIServer, allowed_hosts_for
    from .engine import Engine
    from .protocol import ServerSettings

    apply_limits(args, pipe.limits)
    engine = Engine(pipe, max_queue=args.max_queue, max_batch=args.max_batch)
    settings = ServerSettings(
        model_name=args.served_model_name or served_name(args.model), limits=pipe.limits, think=args.think,
        allowed_image_hosts=frozenset(host.lower() for host in args.allow_image_host),
    )
    server = OpenAIServer(engine, settings, api_key=args.api_key or None,
                          max_body_bytes=args.max_body_mb * 1024 * 1024,
                          allowed_hosts=allowed_hosts_for(args.host, args.allow_host))
    return engine, server


# -- --ray: the same server on Ray Serve replicas (internvl_u_serve.ray) -------------------------
MISSING_RAY = (
    'internvl-u serve: error: --ray needs Ray Serve, the [ray] extra: pip install -e ".[ray]" in your clone, '
    'or pip install "ray[serve]>=2.60,<3"'
)


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """``--ray`` and the placement of its replicas."""
    group = parser.add_argument_group(
        "Ray Serve (--ray)", "serve through Ray Serve: replicas of this server behind Ray's HTTP proxy on "
                             "--host/--port, on this machine or the Ray cluster in $RAY_ADDRESS")
    group.add_argument("--ray", action="store_true",
                       help="run the server as a Ray Serve application (needs the [ray] extra)")
    count = group.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=_bounded(1, 1024, "a replica count"), default=1,
                       help="replicas, each loading the model once (default: 1)")
    count.add_argument("--autoscale", default=None, metavar="MIN:MAX", type=_autoscale,
                       help="let Ray choose between MIN and MAX replicas, aiming at --max-batch requests "
                            "in each (MIN 0 scales to zero when idle)")
    group.add_argument("--gpus-per-replica", type=_fraction("GPUs"), default=0.0, metavar="F",
                       help="GPUs each replica reserves; 0.5 puts two replicas on one GPU (default: 0, "
                            "CPU replicas; use 1 with --device cuda)")
    group.add_argument("--cpus-per-replica", type=_fraction("CPUs"), default=1.0, metavar="F",
                       help="CPU cores each replica reserves (default: 1)")


def run_ray(args: argparse.Namespace) -> int:
    """Start (or join, with $RAY_ADDRESS) a Ray cluster and serve until Ctrl-C or SIGTERM."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print(MISSING_RAY, file=sys.stderr)
        return 1
    import signal
    import threading

    import ray
    from ray import serve

    from internvl_u_serve import ray as on_ray

    # The proxies read this when they start: they answer 503 for a replica that died under a request.
    os.environ.setdefault(on_ray.PROXY_CALLBACK_ENV, on_ray.PROXY_CALLBACK)
    joined = bool(os.environ.get("RAY_ADDRESS"))  # ray.init joins that cluster; else it starts one here
    if not joined:  # Ray's proxy binds --host/--port here: a taken port fails now, not after the replicas load
        sock = _bound_socket(args)
        if sock is None:
            return 2
        sock.close()
    ray.init(include_dashboard=None if joined else False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(on_ray.build_app(args), name="internvl-u", route_prefix="/")
        print(f"internvl-u serve: ready on http://{args.host}:{args.port} (Ray Serve, "
              f"{'autoscaling ' + args.autoscale if args.autoscale else f'{args.replicas} replicas'})",
              file=sys.stderr, flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.delete("internvl-u")  # replicas drain: running requests get --shutdown-timeout seconds
        if not joined:  # a shared cluster keeps its other applications
            serve.shutdown()
        ray.shutdown()
    return 0


def _autoscale(text: str) -> str:
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and int(low) <= int(high) and 1 <= int(high) <= 1024):
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX replicas (0 <= MIN <= MAX, MAX >= 1), e.g. 1:4")
    return text


def _fraction(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 1024 or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {what} (0 or more, e.g. 0.5)")
        return value

    return parse


def _bounded(low: int, high: int, what: str):
    def parse(text: str) -> int:
        value = int(text) if text.strip().lstrip("-").isdigit() else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} ({low}-{high})")
        return value

    return parse
