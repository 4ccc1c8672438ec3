"""`internvl-u mcp`: serve InternVL-U's four tools to MCP clients over stdio or streamable HTTP.

Registered through the `internvl_u.commands` entry-point group; importing this module costs
nothing (the SDK and the model are imported only when the command runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from internvl_u_serve.common import add_model_options, load_model, model_problem

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
        "--allow-lora", action="append", default=[], metavar="NAME=FILE",
        help="a LoRA adapter clients may name in generate_image/edit_image (they see NAME, never the path); "
             "repeat for several (default: none)",
    )
    parser.add_argument(
        "--http", type=_port, default=None, metavar="PORT",
        help=f"serve streamable HTTP at http://{HOST}:PORT/mcp instead of stdio",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until the client disconnects (stdio) or the process is stopped."""
    if importlib.util.find_spec("mcp") is None:
        print(MISSING_SDK, file=sys.stderr)
        return 1
    problem = _check_folders(args)
    loras: dict[str, str] = {}
    for entry in args.allow_lora:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            problem = problem or f"--allow-lora {entry!r}: give NAME=FILE.safetensors"
        loras[name] = path
    if not problem and loras:
        from internvl_u_core.errors import InvalidInputError
        from internvl_u_core.lora import named_adapters

        try:
            named_adapters(loras)  # names and files checked before the model loads
        except InvalidInputError as error:
            problem = f"--allow-lora: {error}"
    if problem:
        print(f"internvl-u mcp: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    from internvl_u_serve.mcp.server import build_server

    server = build_server(load_model(args, "mcp"), args.output_dir, args.allowed_dir, loras)
    if args.http is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host=HOST, port=args.http)
    return 0


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
