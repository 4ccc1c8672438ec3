"""``internvl-u``: understand, reason, generate and edit from the command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

MODEL_ENV = "INTERNVL_U_MODEL"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=os.environ.get(MODEL_ENV),
        help=f"checkpoint folder in the released layout, or a Hugging Face hub id (default: ${MODEL_ENV})",
    )
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weight precision; auto = bfloat16 on CUDA, float32 on CPU (default: auto)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (default: cuda if available)")
    group.add_argument("--offline", action="store_true",
                       help="never contact the hub; use only files already downloaded")
    group.add_argument("--revision", default=None, help="hub branch, tag or commit to download")
    group.add_argument("--offload", action="store_true",
                       help="keep components in CPU memory and move each to the GPU only while it runs "
                            "(for GPUs with little memory)")


def _add_text_options(parser: argparse.ArgumentParser, default_tokens: int) -> None:
    group = parser.add_argument_group("text generation")
    group.add_argument("--max-new-tokens", type=int, default=default_tokens,
                       help=f"longest answer in tokens (default: {default_tokens})")
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    group.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1, greedy)")
    group.add_argument("--seed", type=int, default=None, help="random seed for --sample")


def _add_image_options(parser: argparse.ArgumentParser, size_help: str) -> None:
    group = parser.add_argument_group("image generation")
    group.add_argument("-o", "--output", default="out.png",
                       help="output PNG; with --num-images > 1, _1, _2 … are added (default: out.png)")
    group.add_argument("--width", type=int, default=None, help=f"output width in pixels ({size_help})")
    group.add_argument("--height", type=int, default=None, help=f"output height in pixels ({size_help})")
    group.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    group.add_argument("--cfg", type=float, default=None,
                       help="guidance scale on the instruction (default: 4.5, or 3.5 with --reasoning)")
    group.add_argument("--part-cfg", type=float, default=None,
                       help="guidance scale on the input images/condition (default: 2.0, or 1.5 with --reasoning)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--num-images", type=int, default=1, help="images to draw (default: 1)")
    group.add_argument("--reasoning", action="store_true",
                       help="let the model think first (chain of thought), then draw from prompt + thoughts")
    group.add_argument("--reasoning-tokens", type=int, default=200, help="longest chain of thought (default: 200)")
    group.add_argument("--system-prompt", default=None, help="replace the built-in system message")
    group.add_argument("--vae-tiling", action="store_true",
                       help="encode/decode large images in tiles to save memory (tiny seams possible)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internvl-u",
        description="Run InternVL-U: answer questions about images, reason, generate and edit images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    understand = sub.add_parser("understand", help="answer a question about zero, one or several images")
    understand.add_argument("question", help="the question or instruction")
    understand.add_argument("--image", action="append", default=[], metavar="PATH",
                            help="an input image; repeat for several images in one question")
    understand.add_argument("--system-prompt", default=None, help="replace the built-in system message")
    _add_model_options(understand)
    _add_text_options(understand, 256)

    reason = sub.add_parser("reason", help="print the chain of thought the model writes before drawing")
    reason.add_argument("prompt", help="the image description or edit instruction")
    reason.add_argument("--image", action="append", default=[], metavar="PATH", help="input image(s) for an edit")
    reason.add_argument("--system-prompt", default=None, help="replace the built-in system message")
    _add_model_options(reason)
    _add_text_options(reason, 200)

    generate = sub.add_parser("generate", help="draw an image from a text prompt")
    generate.add_argument("prompt", help="what to draw")
    _add_model_options(generate)
    _add_image_options(generate, "default: the checkpoint's default size")

    edit = sub.add_parser("edit", help="edit one or several images following an instruction")
    edit.add_argument("instruction", help="what to change")
    edit.add_argument("--image", action="append", required=True, metavar="PATH",
                      help="an input image; repeat for several reference images")
    _add_model_options(edit)
    _add_image_options(edit, "default: the first input image's size")
    _add_plugin_commands(sub)
    return parser


PLUGIN_GROUP = "internvl_u.commands"


def _add_plugin_commands(sub) -> None:
    """Subcommands that adapters (e.g. the HTTP and MCP servers) register as entry points.

    Each entry point is a callable ``register(subparsers)`` that adds its parser and sets
    ``handler=callable(args) -> int``; the core never imports an adapter by name.
    """
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as exc:  # a half-installed adapter must not break the core commands
            print(f"internvl-u: warning: command {entry.name!r} unavailable ({exc})", file=sys.stderr)
            continue
        register(sub)


class _StepBar:
    """A one-line progress bar on stderr (no extra dependency)."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int, *_):
        width = 30
        filled = int(width * step / max(total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {step}/{total} {elapsed:5.1f}s")
        if step >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _load(args):
    from .pipeline import InternVLUPipeline

    if not args.model:
        raise SystemExit(f"internvl-u: error: no model given; pass --model PATH_OR_HUB_ID or set ${MODEL_ENV}")
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f}s] {message}", file=sys.stderr, flush=True)

    components = ("vlm",) if args.command == "understand" else ("vlm", "generation_decoder", "vae")
    device = "cpu" if args.offload else args.device
    pipe = InternVLUPipeline.from_pretrained(
        args.model, torch_dtype=args.dtype, device=device, local_files_only=args.offline,
        revision=args.revision, progress=progress, components=components,
    )
    if args.offload:
        pipe.enable_model_cpu_offload(args.device or "cuda")
    if getattr(args, "vae_tiling", False):
        pipe.enable_vae_tiling()
    return pipe


def _output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i + 1}{path.suffix}") for i in range(count)]


def _text_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "temperature": args.temperature,
            "top_p": args.top_p, "num_beams": args.num_beams, "seed": args.seed}


def _check_numbers(args) -> None:
    """Refuse bad numbers before spending seconds on loading the model."""
    from . import validation as check

    if getattr(args, "steps", None) is not None:
        check.steps(args.steps)
        check.count(args.num_images, "num_images")
        for name in ("width", "height"):
            if getattr(args, name) is not None:
                check.integer(getattr(args, name), name, 1, check.DEFAULT_LIMITS.max_side)
    if getattr(args, "max_new_tokens", None) is not None:
        check.integer(args.max_new_tokens, "max_new_tokens", 1, check.DEFAULT_LIMITS.max_new_tokens)
    for path in getattr(args, "image", None) or []:
        if not Path(path).is_file():
            raise SystemExit(f"internvl-u: error: image file {path!r} does not exist")


def run(args) -> int:
    _check_numbers(args)
    pipe = _load(args)
    if args.command == "understand":
        answer = pipe.understand(args.image or None, args.question, system_prompt=args.system_prompt,
                                 **_text_kwargs(args))
        print(answer)
        return 0
    if args.command == "reason":
        reasoning = pipe.reason(args.prompt, args.image or None, system_prompt=args.system_prompt,
                                **_text_kwargs(args))
        print(reasoning.text)
        return 0
    images = getattr(args, "image", None) or []
    prompt = args.prompt if args.command == "generate" else args.instruction
    reasoning = None
    if args.reasoning:
        reasoning = pipe.reason(prompt, images or None, max_new_tokens=args.reasoning_tokens,
                                system_prompt=args.system_prompt)
        print(f"reasoning: {reasoning.text}", file=sys.stderr)
    common = {"width": args.width, "height": args.height, "steps": args.steps, "all_cfg_scale": args.cfg,
              "part_cfg_scale": args.part_cfg, "seed": args.seed, "num_images": args.num_images,
              "reasoning": reasoning, "system_prompt": args.system_prompt, "callback": _StepBar("denoising")}
    if args.command == "generate":
        pictures = pipe.generate(prompt, **common)
    else:
        pictures = pipe.edit(images, prompt, **common)
    for picture, path in zip(pictures, _output_paths(args.output, len(pictures))):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import InternVLUError

    handler = getattr(args, "handler", None)
    try:
        return handler(args) if handler is not None else run(args)
    except InternVLUError as exc:
        print(f"internvl-u: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("internvl-u: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
