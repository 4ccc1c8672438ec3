"""``internvl-u``: understand, reason, generate and edit from the command line."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
from pathlib import Path

from .download import add_command as add_download_command
from .errors import CheckpointNotDownloaded, InternVLUError, InvalidInputError
from .limits import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_GUIDANCE,
    DEFAULT_LIMITS,
    DEFAULT_REASONING_TOKENS,
    DEFAULT_STEPS,
    random_seed,
)
from .options import (
    DEFAULT_HUB_ID,
    OFFLOAD_MODE_HELP,
    OFFLOAD_MODES,
    QUANTIZATION_MODE_HELP,
    QUANTIZATION_MODES,
    ArgumentNames,
)

# This module imports nothing heavy at module level (torch, PIL, the pipeline are imported when a
# command runs), so that --help, --version and mistyped flags answer at once.

MODEL_ENV = "INTERNVL_U_MODEL"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=os.environ.get(MODEL_ENV),
        help=f"checkpoint folder in the released layout, or a Hugging Face hub id such as {DEFAULT_HUB_ID} "
             f"(the released weights, downloaded once) (default: ${MODEL_ENV})",
    )
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weight precision; auto = bfloat16 on CUDA, float32 on CPU (default: auto)")
    group.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1 or mps (default: cuda if available, else cpu)")
    group.add_argument("--offline", action="store_true",
                       help="never contact the hub; use only files already downloaded")
    group.add_argument("--revision", default=None, help="hub branch, tag or commit to download")
    add_memory_options(group)


def add_memory_options(group) -> None:
    """``--quantize`` and ``--offload``, with the core's modes (shared by the adapters' commands)."""
    group.add_argument("--quantize", default=None, choices=QUANTIZATION_MODES, metavar="MODE",
                       help="smaller weights for the LLM and the DiT: "
                            + "; ".join(f"{m}: {QUANTIZATION_MODE_HELP[m]}" for m in QUANTIZATION_MODES)
                            + " (default: full precision)")
    group.add_argument("--offload", nargs="?", const="model", default=None, choices=OFFLOAD_MODES, metavar="MODE",
                       help="keep the weights in CPU memory and move them to the CUDA GPU while they run (needs "
                            "CUDA): " + "; ".join(f"{m}: {OFFLOAD_MODE_HELP[m]}" for m in OFFLOAD_MODES)
                            + " (--offload alone: model)")


def check_memory_options(args, names: ArgumentNames) -> None:
    """Refuse a --device, --quantize or --offload this machine cannot run, before anything is loaded."""
    from .pipeline import check_load_options

    check_load_options(args.device, args.dtype, args.quantize, args.offload, names)


def _add_text_options(parser: argparse.ArgumentParser, default_tokens: int) -> None:
    group = parser.add_argument_group("text generation")
    group.add_argument("--max-new-tokens", type=int, default=default_tokens,
                       help=f"longest answer in tokens (default: {default_tokens})")
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    group.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1, greedy)")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed for --sample (default: a random one, printed)")


def _add_image_options(parser: argparse.ArgumentParser, size_help: str) -> None:
    group = parser.add_argument_group("image generation")
    limits = DEFAULT_LIMITS
    (plain_all, plain_part), (reasoned_all, reasoned_part) = DEFAULT_GUIDANCE["image"], DEFAULT_GUIDANCE["text_image"]
    group.add_argument("-o", "--output", default="out.png",
                       help="output image file; its suffix sets the format (.png, .jpg, .webp …); with "
                            "--num-images > 1, _1, _2 … are added (default: out.png)")
    group.add_argument("--mkdir", action="store_true", help="create the output folder if it does not exist")
    sizes = f"{limits.min_side}–{limits.max_side}"
    group.add_argument("--width", type=int, default=None, help=f"output width in pixels, {sizes} ({size_help})")
    group.add_argument("--height", type=int, default=None, help=f"output height in pixels, {sizes} ({size_help})")
    group.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default: {DEFAULT_STEPS})")
    group.add_argument("--cfg", type=float, default=None,
                       help=f"guidance scale on the instruction (default: {plain_all}, or {reasoned_all} with "
                            "--reasoning)")
    group.add_argument("--part-cfg", type=float, default=None,
                       help=f"guidance scale on the input images/condition (default: {plain_part}, or "
                            f"{reasoned_part} with --reasoning)")
    group.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    group.add_argument("--num-images", type=int, default=1, help="images to draw (default: 1)")
    group.add_argument("--reasoning", action="store_true",
                       help="let the model think first (chain of thought), then draw from prompt + thoughts")
    group.add_argument("--reasoning-tokens", type=int, default=DEFAULT_REASONING_TOKENS,
                       help=f"longest chain of thought (default: {DEFAULT_REASONING_TOKENS})")
    group.add_argument("--system-prompt", default=None, help="replace the built-in system message")
    group.add_argument("--vae-tiling", action="store_true",
                       help="encode/decode large images in tiles to save memory (tiny seams possible)")


class _Parser(argparse.ArgumentParser):
    """argparse with a "did you mean" for mistyped subcommands and choices (subparsers inherit it)."""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            known = re.findall(r"'([^']*)'", choice.group(2)) or [c.strip() for c in choice.group(2).split(",")]
            message += _did_you_mean(choice.group(1), known)
        super().error(message)


def _did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> None:
    """What parse_args does with arguments nobody took, but in the subcommand's words, with suggestions."""
    command_parser = _subcommands(parser).choices.get(getattr(args, "command", None), parser)
    flags = [s for action in command_parser._actions for s in action.option_strings]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], flags, n=1, cutoff=0.6)
            if close:
                hints.append(close[0])
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    command_parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="internvl-u",
        description="Run InternVL-U: answer questions about images, reason, generate and edit images.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    understand = sub.add_parser("understand", help="answer a question about zero, one or several images")
    understand.add_argument("question", help="the question or instruction")
    understand.add_argument("--image", action="append", default=[], metavar="PATH",
                            help="an input image; repeat for several images in one question")
    understand.add_argument("--system-prompt", default=None, help="replace the built-in system message")
    _add_model_options(understand)
    _add_text_options(understand, DEFAULT_ANSWER_TOKENS)

    reason = sub.add_parser("reason", help="print the chain of thought the model writes before drawing")
    reason.add_argument("prompt", help="the image description or edit instruction")
    reason.add_argument("--image", action="append", default=[], metavar="PATH", help="input image(s) for an edit")
    reason.add_argument("--system-prompt", default=None, help="replace the built-in system message")
    _add_model_options(reason)
    _add_text_options(reason, DEFAULT_REASONING_TOKENS)

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
    add_download_command(sub)
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
            sys.stderr.write("\ndecoding the image with the VAE …\n")
        sys.stderr.flush()


_TEXT_ARGUMENT = {"understand": "question", "reason": "prompt", "generate": "prompt", "edit": "instruction"}
CLI_NAMES = ArgumentNames(
    width="--width", height="--height", steps="--steps", num_images="--num-images", all_cfg_scale="--cfg",
    part_cfg_scale="--part-cfg", seed="--seed", device="--device", max_new_tokens="--max-new-tokens",
    min_new_tokens="--min-new-tokens", do_sample="--sample", temperature="--temperature", top_p="--top-p",
    num_beams="--num-beams", quantization="--quantize", offload="--offload", flags=True,
)


def _check_arguments(args) -> None:
    """Refuse every bad argument before loading the model (seconds here, minutes for the released one).

    Replaces ``args.image`` with the decoded images, fills in a random seed where none was given and
    adds ``args.outputs`` (the files to write) for the drawing commands.
    """
    limits = DEFAULT_LIMITS
    if not args.model:
        raise InvalidInputError(
            f"no model given; pass --model {DEFAULT_HUB_ID} (the released weights) or a checkpoint folder, "
            f"or set ${MODEL_ENV}"
        )
    if not _is_hub_id(args.model):  # a folder: its layout is checked first, before torch is even imported
        args.model = _find_model(args)
    from . import validation as check

    check_memory_options(args, CLI_NAMES)
    text_argument = _TEXT_ARGUMENT[args.command]
    check.text(getattr(args, text_argument), text_argument, limits)
    if not getattr(args, text_argument).strip():
        raise InvalidInputError(
            f"the {text_argument} is empty; {_EMPTY_ADVICE[args.command]}, e.g. "
            f"internvl-u {args.command} \"{_EXAMPLES[args.command]}\""
        )
    check.system_prompt(args.system_prompt, limits, "--system-prompt")
    args.image = check.image_list(getattr(args, "image", None), "--image", allow_empty=True, limits=limits)
    if args.command in ("understand", "reason"):
        check.text_kwargs(_text_kwargs(args), None, limits, CLI_NAMES)
        args.model = _find_model(args)  # a hub id: downloaded (once) only after every other check
        if args.sample:
            args.seed = _seed_or_random(args.seed, limits)
        return
    check.requested_size(args.height, args.width, None, limits, CLI_NAMES)
    if args.image and args.width is None and args.height is None:
        _fit_to_the_limits(args, limits)
    check.steps(args.steps, limits, "--steps")
    check.num_images(args.num_images, limits, "--num-images")
    for value, name in ((args.cfg, "--cfg"), (args.part_cfg, "--part-cfg")):
        if value is not None:
            check.guidance_scale(value, name, limits)
    if args.reasoning:
        check.integer(args.reasoning_tokens, "--reasoning-tokens", 1, limits.max_new_tokens)
    args.outputs = _output_paths(args.output, args.num_images, args.mkdir)
    args.model = _find_model(args)  # a hub id: downloaded (once) only after every other check
    args.seed = _seed_or_random(args.seed, limits)


def _fit_to_the_limits(args, limits) -> None:
    """An edit draws at its first image's size; a larger photo is drawn at the largest size allowed, said once."""
    from . import validation as check

    first = args.image[0]
    fitted = check.fitted_size(first.width, first.height, limits)
    if fitted != first.size:
        args.width, args.height = fitted
        width, height = first.info.get("original_size", first.size)
        print(f"internvl-u: note: the first --image ({width}×{height}) is larger than an output may be "
              f"({limits.max_side} pixels a side, {limits.max_pixels:,} in all); drawing at {fitted[0]}×{fitted[1]} "
              "(pass --width and --height to choose)", file=sys.stderr)


_EMPTY_ADVICE = {"understand": "ask a question", "reason": "describe the image or the edit",
                 "generate": "describe what to draw", "edit": "say what to change"}
_EXAMPLES = {"understand": "What is in this picture?", "reason": "a lighthouse at dusk",
             "generate": "a red fox in fresh snow", "edit": "make the sky stormy"}


def _is_hub_id(model: str) -> bool:
    from .download import HUB_ID_PATTERN

    return bool(HUB_ID_PATTERN.match(model)) and not Path(model).expanduser().exists()


def _find_model(args) -> str:
    """The checkpoint folder behind --model, its layout checked (a hub id is downloaded once, here).

    A folder is checked before anything else (nothing heavy imported yet), a hub id after every other
    argument (it may download); both before the seed line, so a wrong --model is refused at once.
    """
    from .download import COMPONENTS, component_folder, resolve_checkpoint

    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f}s] {message}", file=sys.stderr, flush=True)

    root = resolve_checkpoint(args.model, local_files_only=args.offline, revision=args.revision, progress=progress)
    if not (root / "model_index.json").is_file():
        raise InvalidInputError(
            f"--model {args.model!r}: {root} has no model_index.json; pass the folder of an InternVL-U "
            f"checkpoint in the released layout (internvl-u download --local-dir FOLDER fetches one)"
        )
    needed = ("vlm", "processor") if args.command in ("understand", "reason") else COMPONENTS
    for name in needed:
        component_folder(root, name)
    return str(root)


def _seed_or_random(seed: int | None, limits) -> int:
    from . import validation as check

    if seed is not None:
        return check.optional_seed(seed, limits, "--seed")
    seed = random_seed()
    print(f"seed: {seed} (pass --seed {seed} to get the same result)", file=sys.stderr)
    return seed


def _output_paths(output: str, count: int, mkdir: bool) -> list[tuple[Path, str]]:
    """The files to write and their image format (from the suffix), checked before any work."""
    path = Path(output).expanduser()
    if path.is_dir():
        raise InvalidInputError(f"-o/--output {output!r} is a folder; give a file name such as {path / 'out.png'}")
    if not path.suffix:
        raise InvalidInputError(f"-o/--output {output!r} has no suffix; end it in .png, .jpg or .webp")
    image_format = _save_formats().get(path.suffix.lower())
    if image_format is None:
        raise InvalidInputError(
            f"-o/--output {output!r}: cannot write images in the {path.suffix!r} format; end it in "
            f"{', '.join(sorted(_save_formats()))}"
        )
    folder = path.parent
    if not folder.is_dir():
        if not mkdir:
            raise InvalidInputError(
                f"-o/--output {output!r}: folder {str(folder)!r} does not exist; create it or add --mkdir"
            )
        folder.mkdir(parents=True, exist_ok=True)
    if count == 1:
        return [(path, image_format)]
    return [(path.with_name(f"{path.stem}_{i + 1}{path.suffix}"), image_format) for i in range(count)]


def _save_formats() -> dict[str, str]:
    """File suffix → PIL format name, for the RGB formats this Pillow can write."""
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in _RGB_FORMATS and fmt in Image.SAVE}


_RGB_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")


def _load(args):
    from .pipeline import InternVLUPipeline

    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f}s] {message}", file=sys.stderr, flush=True)

    components = ("vlm",) if args.command in ("understand", "reason") else ("vlm", "generation_decoder", "vae")
    pipe = InternVLUPipeline.from_pretrained(
        args.model, torch_dtype=args.dtype, device=args.device, local_files_only=args.offline,
        revision=args.revision, progress=progress, components=components, quantization=args.quantize,
        offload=args.offload,
    )
    if getattr(args, "vae_tiling", False):
        pipe.enable_vae_tiling()
    return pipe


def _text_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "temperature": args.temperature,
            "top_p": args.top_p, "num_beams": args.num_beams}


def run(args) -> int:
    _check_arguments(args)
    pipe = _load(args)
    if args.command == "understand":
        answer = pipe.understand(args.image, args.question, system_prompt=args.system_prompt, seed=args.seed,
                                 **_text_kwargs(args))
        print(answer)
        return 0
    if args.command == "reason":
        reasoning = pipe.reason(args.prompt, args.image, system_prompt=args.system_prompt, seed=args.seed,
                                **_text_kwargs(args))
        print(reasoning.text)
        return 0
    prompt = args.prompt if args.command == "generate" else args.instruction
    reasoning = None
    if args.reasoning:
        reasoning = pipe.reason(prompt, args.image, max_new_tokens=args.reasoning_tokens,
                                system_prompt=args.system_prompt)
        print(f"reasoning: {reasoning.text}", file=sys.stderr)
    common = {"width": args.width, "height": args.height, "steps": args.steps, "all_cfg_scale": args.cfg,
              "part_cfg_scale": args.part_cfg, "seed": args.seed, "num_images": args.num_images,
              "reasoning": reasoning, "system_prompt": args.system_prompt, "callback": _StepBar("denoising")}
    if args.command == "generate":
        pictures = pipe.generate(prompt, **common)
    else:
        pictures = pipe.edit(args.image, prompt, **common)
    for picture, (path, image_format) in zip(pictures, args.outputs):
        print(f"writing {path} …", file=sys.stderr, flush=True)
        picture.save(path, format=image_format, **_SAVE_OPTIONS.get(image_format, {}))
        print(path)
    return 0


_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _refuse_unknown(parser, args, extras)
    handler = getattr(args, "handler", None)
    try:
        return handler(args) if handler is not None else run(args)
    except CheckpointNotDownloaded as exc:
        print(
            f"internvl-u: error: {exc.hub_id!r} is not downloaded yet and --offline (or HF_HUB_OFFLINE=1) forbids "
            "downloading; run once without --offline, or pass --model with a checkpoint folder",
            file=sys.stderr,
        )
        return 2
    except InternVLUError as exc:
        print(f"internvl-u: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("internvl-u: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
