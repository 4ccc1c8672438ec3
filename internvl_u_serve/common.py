"""What the serving commands share: the model options and loading the pipeline before serving.

Imports nothing heavy at module level (the commands are registered on every ``internvl-u`` call).
"""

from __future__ import annotations

import argparse
import os
import sys

from internvl_u_core.cli import CLI_NAMES, MODEL_ENV, add_memory_options, check_memory_options
from internvl_u_core.errors import InvalidInputError


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=os.environ.get(MODEL_ENV),
        help=f"checkpoint folder in the released layout, or a Hugging Face hub id (default: ${MODEL_ENV})",
    )
    group = parser.add_argument_group("model")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weight precision; auto = bfloat16 on CUDA, float32 on CPU (default: auto)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (default: cuda if available)")
    group.add_argument("--offline", action="store_true", help="never contact the hub; use only downloaded files")
    group.add_argument("--revision", default=None, help="hub branch, tag or commit to download")
    add_memory_options(group)


def check_model_options(args: argparse.Namespace) -> str | None:
    """Why the device, --quantize or --offload cannot run on this machine (in flag words), or None."""
    try:
        check_memory_options(args, CLI_NAMES)
    except InvalidInputError as exc:
        return str(exc)
    return None


def load_pipeline(args: argparse.Namespace, command: str):
    """The pipeline the options describe, loaded with progress lines on stderr."""
    from internvl_u_core import InternVLUPipeline

    def progress(message: str) -> None:
        print(f"internvl-u {command}: {message}", file=sys.stderr, flush=True)

    return InternVLUPipeline.from_pretrained(
        args.model, torch_dtype=args.dtype, device=args.device, local_files_only=args.offline,
        revision=args.revision, progress=progress, quantization=args.quantize, offload=args.offload,
    )
