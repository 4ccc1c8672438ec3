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
from internvl_u_serve.common import add_model_options, load_pipeline, model_problem

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
                     help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, else none)")
    net.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the model name clients send and /v1/models lists (default: the --model value)")
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
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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
    from .app import OpenAIServer, serve_forever
    from .engine import Engine
    from .protocol import ServerSettings

    pipe = load_pipeline(args, "serve")
    engine = Engine(pipe, max_queue=args.max_queue, max_batch=args.max_batch)
    settings = ServerSettings(
        model_name=args.served_model_name or args.model, limits=pipe.limits, think=args.think,
        allowed_image_hosts=frozenset(host.lower() for host in args.allow_image_host),
    )
    server = OpenAIServer(engine, settings, api_key=args.api_key or None,
                          max_body_bytes=args.max_body_mb * 1024 * 1024)
    try:
        serve_forever(server, host=args.host, port=args.port, log_level=args.log_level,
                      shutdown_timeout=args.shutdown_timeout)
    finally:
        engine.close()
    return 0


def _bounded(low: int, high: int, what: str):
    def parse(text: str) -> int:
        value = int(text) if text.strip().lstrip("-").isdigit() else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} ({low}-{high})")
        return value

    return parse
