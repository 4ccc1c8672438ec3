"""The quantisation and offload ladder on a GPU: ``python bench/gpu_quant_check.py`` (bench/README.md).

Part of the prepared GPU check (``bench/gpu_check.sh``, which calls :func:`run_ladder`), and runnable
on its own. On a CUDA device, each variant in its own process: bfloat16 (the reference point), every
quantisation mode the GPU runs (int8, fp8 on compute capability 8.9+, nf4 with bitsandbytes), and the
offload rungs (model, group, sequential; int8 with model offload). Each loads the GPU check's
random-weight checkpoint at the released widths and depths (bfloat16, built once), draws a 1024² image with 20 steps and
decodes 32 forced tokens of an answer, and reports the time per image and per step, the decode
speed, the peak VRAM of loading and of each job, and the drift against bfloat16 (image max/mean
difference and PSNR, logit cosine and KL over the fixed question set of ``bench/quant.py``).

Without CUDA (or with ``--cpu``) the same path runs on the CPU at tiny sizes (the tiny fixture
checkpoint, 64², 2 steps, 4 tokens) with the CPU modes, float32 as the reference point and no
offload rungs (they need a GPU); a test runs it. Results: JSON (+ the images) in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from checkpoint import ensure_checkpoint  # noqa: E402
from quant import QUESTIONS, image_drift, logit_drift  # noqa: E402
from worker import PROMPT, QUESTION, test_image  # noqa: E402

TINY_CHECKPOINT = REPO / "tests" / "fixtures" / "internvlu-tiny" / "checkpoint"
#: name -> from_pretrained options; the first is the reference point of the drift.
CUDA_VARIANTS = {
    "bf16": {},
    "int8": {"quantization": "int8"},
    "fp8": {"quantization": "fp8"},
    "nf4": {"quantization": "nf4"},
    "offload_model": {"offload": "model"},
    "offload_group": {"offload": "group"},
    "offload_sequential": {"offload": "sequential"},
    "int8+offload_model": {"quantization": "int8", "offload": "model"},
}
CPU_VARIANTS = {"float32": {}, "int8": {"quantization": "int8"}, "bf16": {"quantization": "bf16"}}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Child: one variant
# ----------------------------------------------------------------------------------------------
def child(args) -> dict:
    import numpy as np
    import torch

    from internvl_u_core import InternVLUPipeline

    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def peak_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None

    options = json.loads(args.options)
    dtype = torch.bfloat16 if cuda else torch.float32
    start = now()
    pipe = InternVLUPipeline.from_pretrained(args.ckpt, torch_dtype=dtype, device=args.device, **options)
    result: dict = {"load_s": round(now() - start, 3), "load_peak_vram_gib": peak_gib(),
                    "weights_gib": round(pipe.model_size_bytes() / 2**30, 3),
                    "quantization": pipe.quantization.describe() if pipe.quantization else None,
                    "offload": pipe.offload_mode}
    steps: list[float] = []
    tokens: list[float] = []

    def draw():
        steps.clear()
        return pipe.generate(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=0,
                             callback=lambda *_: steps.append(now()))[0]

    for _ in range(args.warmup):
        draw()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = now()
    image = draw()
    gaps = sorted(b - a for a, b in zip(steps, steps[1:]))
    result["t2i"] = {"total_s": round(now() - start, 3), "peak_vram_gib": peak_gib(),
                     "dit_step_s": round(gaps[len(gaps) // 2], 4) if gaps else None}
    np.save(Path(args.out) / f"{args.name}-t2i.npy", np.asarray(image))
    image.save(Path(args.out) / f"{args.name}-t2i.png")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    picture = test_image(448)
    start = now()
    pipe(QUESTION, picture, "text", max_new_tokens=args.tokens, min_new_tokens=args.tokens,
         token_callback=lambda *_: tokens.append(now()))
    result["understand"] = {"total_s": round(now() - start, 3), "peak_vram_gib": peak_gib(),
                            "decode_tok_s": round((len(tokens) - 1) / (tokens[-1] - tokens[0]), 2)
                            if len(tokens) > 1 else None}
    logits = torch.stack([pipe.next_token_logits(q, picture if with_image else None) for q, with_image in QUESTIONS])
    torch.save(logits, Path(args.out) / f"{args.name}-logits.pt")
    return result


# ----------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------
def runnable(options: dict, device: str) -> str | None:
    """Why this variant cannot run here (checked by the core, before loading), or None."""
    from internvl_u_core import InternVLUError
    from internvl_u_core.pipeline import check_load_options

    try:
        check_load_options(device, "auto", options.get("quantization"), options.get("offload"))
    except InternVLUError as exc:
        return str(exc)
    return None


def run_ladder(device: str, ckpt: Path, out: Path, threads: int, site: str | None = None,
               names: list[str] | None = None) -> dict:
    """Every variant of the ladder on ``device``, each in its own process; images and logits into ``out``.

    ``site``: a folder with packages to put first on the children's path (the GPU check's carried wheels).
    """
    cuda = device.startswith("cuda")
    variants = CUDA_VARIANTS if cuda else CPU_VARIANTS
    reference = next(iter(variants))
    if names:
        unknown = [n for n in names if n not in variants]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(variants)}")
        variants = {k: v for k, v in variants.items() if k in names or k == reference}
    size, steps, warmup, tokens = (1024, 20, 1, 32) if cuda else (64, 2, 0, 4)
    out.mkdir(parents=True, exist_ok=True)
    ladder: dict = {"config": {"size": size, "steps": steps, "warmup": warmup, "tokens": tokens,
                               "reference": reference}, "variants": {}}
    paths = [str(Path(site).resolve())] if site else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO)])}
    for name, options in variants.items():
        reason = runnable(options, device)
        if reason:
            log(f"[ladder] {name} skipped: {reason}")
            ladder["variants"][name] = {"skipped": reason}
            continue
        log(f"[ladder] {name}: {options or 'no options'}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--options", json.dumps(options),
               "--ckpt", str(ckpt), "--device", device, "--out", str(out), "--size", str(size), "--steps", str(steps),
               "--warmup", str(warmup), "--tokens", str(tokens), "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
        if done.returncode != 0:
            log(done.stderr[-3000:])
            lines = done.stderr.strip().splitlines()
            ladder["variants"][name] = {"error": lines[-1][:500] if lines else f"exit code {done.returncode}"}
            continue
        ladder["variants"][name] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"[ladder] {name}: {ladder['variants'][name]}")
    _add_drift(ladder, out, reference)
    return ladder


def ladder_markdown(ladder: dict) -> str:
    reference = ladder["config"]["reference"]
    lines = [f"| variant | weights GiB | load s | peak VRAM load / t2i / understand GiB | t2i s | DiT s/step | "
             f"decode tok/s | t2i vs {reference}: max / mean / PSNR | logit cosine (min) | KL median |",
             "|---|---:|---:|---|---:|---:|---:|---|---|---:|"]
    for name, v in ladder["variants"].items():
        if "t2i" not in v:
            lines.append(f"| {name} | {(v.get('skipped') or v.get('error') or '')[:100]} | | | | | | | | |")
            continue
        peaks = " / ".join(str(x) for x in (v["load_peak_vram_gib"], v["t2i"]["peak_vram_gib"],
                                            v["understand"]["peak_vram_gib"]))
        image, text = v.get("t2i_drift"), v.get("text_drift")
        image_text = f"{image['max_abs']:.0f} / {image['mean_abs']} / {image['psnr_db']} dB" if image else "reference"
        text_text = f"{text['cosine_median']} ({text['cosine_min']}) | {text['kl_median']}" if text else "| "
        lines.append(f"| {name} | {v['weights_gib']} | {v['load_s']} | {peaks} | {v['t2i']['total_s']} | "
                     f"{v['t2i']['dit_step_s']} | {v['understand']['decode_tok_s']} | {image_text} | {text_text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_quant_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the CPU fallback even when CUDA is present")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    p.add_argument("--cache", type=Path, default=Path("/tmp/internvlu-gpu-check"),
                   help="checkpoint cache on CUDA (the GPU check's: the bf16 checkpoint is built once)")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON and the images")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--options", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    for name in ("size", "steps", "warmup", "tokens"):
        p.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.name = args.child
        print(json.dumps(child(args)))
        return 0

    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    ckpt = ensure_checkpoint("all", say=log, cache=args.cache, dtype="bfloat16") if cuda else TINY_CHECKPOINT
    started = _dt.datetime.now().astimezone()
    out = args.out or BENCH / "results" / f"gpu-quant-{device}-{started.strftime('%Y%m%d-%H%M%S')}"
    names = [v.strip() for v in args.variants.split(",")] if args.variants else None
    try:
        ladder = run_ladder(device, ckpt, out, args.threads, names=names)
    except ValueError as exc:
        log(f"error: {exc}")
        return 2
    doc = {"created": started.isoformat(timespec="seconds"), "device": torch.cuda.get_device_name() if cuda else "cpu",
           "checkpoint": str(ckpt), "ladder": ladder}
    (out / "gpu_quant_check.json").write_text(json.dumps(doc, indent=1))
    print(ladder_markdown(ladder))
    log(f"results: {out / 'gpu_quant_check.json'}")
    return 0


def _add_drift(doc: dict, out: Path, reference: str) -> None:
    """Image and logit drift of every variant that ran against the reference variant."""
    import numpy as np
    import torch

    if "t2i" not in doc["variants"].get(reference, {}):
        return
    ref_image = np.load(out / f"{reference}-t2i.npy")
    ref_logits = torch.load(out / f"{reference}-logits.pt")
    for name, entry in doc["variants"].items():
        if name == reference or "t2i" not in entry:
            continue
        entry["t2i_drift"] = image_drift(ref_image, np.load(out / f"{name}-t2i.npy"))
        entry["text_drift"] = logit_drift(ref_logits, torch.load(out / f"{name}-logits.pt"))


if __name__ == "__main__":
    sys.exit(main())
