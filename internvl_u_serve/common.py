"""What the serving commands share: the model options and loading the model before serving.

Imports nothing heavy at module level (the commands are registered on every ``internvl-u`` call).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from internvl_u_core.cli import CLI_NAMES, MODEL_ENV, add_memory_options, check_memory_options
from internvl_u_core.errors import InvalidInputError
from internvl_u_core.limits import DEFAULT_LIMITS, Limits
from internvl_u_core.options import API_KEY_ENV, is_server_url

#: The options that only describe loading a checkpoint here (attribute -> flag); unset they are None,
#: False or "auto".
_LOADING_OPTIONS = {"dtype": "--dtype", "device": "--device", "offline": "--offline", "revision": "--revision",
                    "quantize": "--quantize", "offload": "--offload"}


def add_model_options(parser: argparse.ArgumentParser, *, remote: bool = False) -> None:
    """``--model`` and the loading options; with ``remote`` ``--model`` may also be a server's URL."""
    served = (f", or the URL of an 'internvl-u serve' server (http://host:8091; its key is read from "
              f"${API_KEY_ENV})") if remote else ""
    parser.add_argument(
        "--model", default=os.environ.get(MODEL_ENV),
        help=f"checkpoint folder in the released layout, or a Hugging Face hub id{served} (default: ${MODEL_ENV})",
    )
    group = parser.add_argument_group("model")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weight precision; auto = bfloat16 on CUDA, float32 on CPU (default: auto)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (default: cuda if available)")
    group.add_argument("--offline", action="store_true", help="never contact the hub; use only downloaded files")
    group.add_argument("--revision", default=None, help="hub branch, tag or commit to download")
    add_memory_options(group)


#: ``--max-*`` flag → (the ``Limits`` fields it sets, what it bounds); each may only lower the core's default.
LIMIT_OPTIONS = {
    "max_pixels": (("max_pixels", "max_input_pixels"), "width × height of a requested image, and the pixels of an "
                                                       "input image (larger inputs are refused)"),
    "max_steps": (("max_steps",), "denoising steps of one request"),
    "max_images": (("max_output_images",), "images drawn by one request (n)"),
    "max_input_images": (("max_images_per_prompt",), "input images of one request"),
    "max_new_tokens": (("max_new_tokens",), "tokens of one answer or chain of thought"),
}


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """The ``--max-*`` flags that tighten what one request may ask for (serve and mcp share them)."""
    group = parser.add_argument_group("limits per request (for a shared deployment; default: the core's)")
    for name, (fields, what) in LIMIT_OPTIONS.items():
        ceiling = min(getattr(DEFAULT_LIMITS, field) for field in fields)
        group.add_argument(f"--{name.replace('_', '-')}", type=_positive_up_to(ceiling), default=None, metavar="N",
                           help=f"at most N {what} (1-{ceiling:,}; default {ceiling:,})")


def apply_limits(args: argparse.Namespace, limits: Limits) -> Limits:
    """``limits`` with the ``--max-*`` flags applied (lowered, never raised); returns the same object."""
    for name, (fields, _) in LIMIT_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None:
            for field in fields:
                setattr(limits, field, min(getattr(limits, field), value))
    return limits


def served_name(model: str) -> str:
    """What clients call the model by default: a hub id as given, a checkpoint folder by its own name
    (never the server's full path, which would tell every client about this machine's files)."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith(("/", ".", "~")) or (os.altsep and os.altsep in model):
        return path.resolve().name or "internvl-u"
    return model


def _positive_up_to(ceiling: int):
    def parse(text: str) -> int:
        value = int(text) if text.strip().isdigit() and len(text.strip()) < 20 else 0
        if not 1 <= value <= ceiling:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number in 1-{ceiling:,}")
        return value

    return parse


def model_problem(args: argparse.Namespace, *, remote: bool = False) -> str | None:
    """Why ``--model`` and the loading options cannot work (in flag words), or None; checked before loading.

    That covers a device, --quantize or --offload this machine cannot run, and, with ``remote``, loading
    options given with a server's URL (they belong to that server).
    """
    if not args.model:
        return f"no model given; pass --model PATH_OR_HUB_ID or set ${MODEL_ENV}"
    if is_server_url(args.model):
        if not remote:
            return f"--model {args.model!r} is a URL; this command serves a checkpoint folder or hub id"
        given = [flag for name, flag in _LOADING_OPTIONS.items() if getattr(args, name) not in (None, False, "auto")]
        if given:
            return f"{', '.join(given)} apply to a model loaded here; a served model ({args.model}) is set up on its server"
        return None
    try:
        check_memory_options(args, CLI_NAMES)
    except InvalidInputError as exc:
        return str(exc)
    return None


def load_model(args: argparse.Namespace, command: str):
    """The model the options describe: a ``RemoteInternVLU`` for a server's URL, else the loaded pipeline."""
    if is_server_url(args.model):
        from internvl_u_core import RemoteInternVLU

        return RemoteInternVLU(args.model)
    return load_pipeline(args, command)


def load_pipeline(args: argparse.Namespace, command: str):
    """The pipeline the options describe, loaded with progress lines on stderr."""
    from internvl_u_core import InternVLUPipeline

    def progress(message: str) -> None:
        print(f"internvl-u {command}: {message}", file=sys.stderr, flush=True)

    # MCP's stdio mode speaks on stdout: nothing printed while loading may reach it.
    with contextlib.redirect_stdout(sys.stderr):
        return InternVLUPipeline.from_pretrained(
            args.model, torch_dtype=args.dtype, device=args.device, local_files_only=args.offline,
            revision=args.revision, progress=progress, quantization=args.quantize, offload=args.offload,
        )
