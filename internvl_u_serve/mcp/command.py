"""`internvl-u mcp`: serve InternVL-U's four tools to MCP clients over stdio or streamable HTTP.

Registered through the `internvl_u.commands` entry-point group; importing this module costs
nothing (the SDK and the model are imported only when the command runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import socket
import sys
from pathlib import Path

from internvl_u_serve.common import add_limit_options, add_model_options, apply_limits, load_model, model_problem

MISSING_SDK = (
    'internvl-u mcp: error: the MCP SDK is not installed; install the [mcp] extra: pip install -e ".[mcp]" '
    'in your clone, or pip install "mcp>=2.0,<3"'
)
HOST = "127.0.0.1"  # no authentication: reachable from this machine only


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `mcp` subcommand to the `internvl-u` parser."""
    parser = subparsers.add_parser(
        "mcp",
        help="serve understand/reason/generate/edit as MCP tools (stdio, or streamable HTTP with --http)",
        description=(
            "Run an MCP server with the tools understand_image, reason, generate_image and edit_image. "
            "It talks over stdin/stdout (for Claude Desktop and other MCP clients) unless --http is given. "
            "Clients may read image files only inside --allowed-dir folders and --output-dir."
        ),
    )
    add_model_options(parser, remote=True)
    parser.add_argument(
        "--output-dir", default="internvl-u-outputs", metavar="DIR",
        help="folder for generated and edited images, saved as <image_id>.png (default: ./internvl-u-outputs)",
    )
    parser.add_argument(
        "--allowed-dir", action="append", default=[], metavar="DIR",
        help="a folder whose image files clients may name as inputs; repeat for several (default: none, "
             "only images in --output-dir)",
    )
    parser.add_argument(
        "--http", type=_port, default=None, metavar="PORT",
        help=f"serve streamable HTTP at http://{HOST}:PORT/mcp instead of stdio",
    )
    add_limit_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until the client disconnects (stdio) or the process is stopped."""
    if importlib.util.find_spec("mcp") is None:
        print(MISSING_SDK, file=sys.stderr)
        return 1
    problem = _check_folders(args)
    if problem:
        print(f"internvl-u mcp: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    from internvl_u_serve.mcp.server import build_server

    if args.http is not None:
        problem = _port_problem(args.http)  # before the weights load: a taken port fails in a second
        if problem:
            print(f"internvl-u mcp: error: {problem}", file=sys.stderr)
            return 2
    model = load_model(args, "mcp")
    apply_limits(args, model.limits)
    server = build_server(model, args.output_dir, args.allowed_dir)
    if args.http is None:
        server.run("stdio")
        return 0
    # uvicorn raises SIGTERM again after its graceful shutdown; absorbed here, so that the exit status
    # is 0 (as `internvl-u serve` exits) rather than death by the signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run("streamable-http", host=HOST, port=args.http)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _port_problem(port: int) -> str | None:
    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, port))
        except OSError as exc:
            return f"cannot listen on {HOST}:{port} ({exc.strerror}); pick another --http port"
    return None


def _check_folders(args: argparse.Namespace) -> str | None:
    """Refuse a missing model or folder, or a mode this machine cannot run, before loading the model."""
    problem = model_problem(args, remote=True)
    if problem:
        return problem
    for folder in args.allowed_dir:
        if not Path(folder).is_dir():
            return f"--allowed-dir {folder!r} is not a folder"
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        return f"--output-dir {args.output_dir!r} exists and is not a folder"
    return None


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port
