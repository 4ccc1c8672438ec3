"""The prepared GPU check (run it through ``bench/gpu_check.sh``; see bench/README.md).

On a CUDA device: a random-weight checkpoint at the released widths and depths, stored in
bfloat16 (built once into ``--cache``), a 1024² text-to-image call with 20 steps in bfloat16, run
by our pipeline with every attention backend diffusers can use there, with the first-block cache
(lossy, opt-in) and with regional compilation, and by the official reference side by side (``--reference``, its own packages in
``--reference-site``). Reports time per image, DiT time per step, peak VRAM, the pixel difference
between the variants and against the reference, and the DiT's compute floor: its FLOPs for the
call over the matrix-multiply rate measured on the device. Then the quantisation and offload
ladder (``bench/gpu_quant_check.py``): every quantisation mode and offload rung in its own process,
with peak VRAM, time and drift against bf16 (``--ladder only`` runs just that, ``off`` skips it).
Then one LoRA training step (``bench/lora.py``, its own process): 1024², released widths and depths,
bf16, gradient checkpointing, rank 16 on every attention and MLP projection; time per step and peak
VRAM (goal: under 24 GB). ``--lora off`` skips it, ``only`` runs just that.

Without CUDA (or with ``--cpu``) the same path runs at tiny sizes on the CPU: the tiny fixture
checkpoint, 64², 2 steps, the CPU backends, compilation with the ``eager`` backend. A test runs it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from checkpoint import ensure_checkpoint  # noqa: E402
from gpu_quant_check import ladder_markdown, run_ladder  # noqa: E402

PROMPT = "A red fox sitting in a snowy forest at sunrise, detailed photograph"
TINY_CHECKPOINT = REPO / "tests" / "fixtures" / "internvlu-tiny" / "checkpoint"
CUDA_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flex", "flash", "_flash_3",
                 "sage", "xformers")
CPU_BACKENDS = ("native", "_native_math")
FBCACHE_THRESHOLD = 0.05


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Shared by both children: one timed text-to-image call
# ----------------------------------------------------------------------------------------------
class Timing:
    """Wall time of a call and the intervals between denoising steps, synchronising CUDA first."""

    def __init__(self, torch, device: str):
        self.torch, self.cuda = torch, device.startswith("cuda")
        self.marks: list[float] = []

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def step(self, *_args) -> None:
        self.marks.append(self.now())

    def per_step(self) -> float | None:
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return statistics.median(gaps) if gaps else None


def timed_calls(torch, device: str, call, runs: int, warmup: int) -> dict:
    """``call(step_callback)`` → image, ``warmup`` untimed then ``runs`` timed; the first image and the numbers."""
    first = None
    warmup_s = []
    for _ in range(warmup):
        timing = Timing(torch, device)
        start = timing.now()
        call(timing.step)
        warmup_s.append(timing.now() - start)
    totals, steps, peaks = [], [], []
    for _ in range(runs):
        timing = Timing(torch, device)
        if timing.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = timing.now()
        image = call(timing.step)
        totals.append(timing.now() - start)
        steps.append(timing.per_step())
        if timing.cuda:
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        first = first or image
    return {
        "image": first,
        "warmup_s": [round(x, 4) for x in warmup_s],
        "total_s": [round(x, 4) for x in totals],
        "total_median_s": round(statistics.median(totals), 4),
        "dit_step_median_s": round(statistics.median(s for s in steps if s is not None), 5) if any(steps) else None,
        "peak_vram_gib": round(max(peaks), 3) if peaks else None,
    }


# ----------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------
def child_ours(args) -> dict:
    import torch

    from internvl_u_core import InternVLUPipeline

    device = args.device
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = InternVLUPipeline.from_pretrained(args.ckpt, torch_dtype=torch.bfloat16, device=device)
    result: dict = {"load_s": round(time.perf_counter() - start, 3), "variants": {}}
    dit = pipe.generation_decoder.decoder
    result["dit"] = {k: dit.config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")}
    rows: list[list[int]] = []
    prepare = dit.prepare_context

    def recording_prepare(*a, **kw):
        context = prepare(*a, **kw)
        rows.append([end - start for start, end in context.row_spans])
        return context

    dit.prepare_context = recording_prepare

    def call(step):
        generator = torch.Generator().manual_seed(0)
        return pipe(PROMPT, generation_mode="image", height=args.size, width=args.size,
                    num_inference_steps=args.steps, generator=generator, callback=step).images[0]

    def measure(name: str) -> None:
        try:
            timed = timed_calls(torch, device, call, args.runs, args.warmup)
        except Exception as exc:  # a backend that fails at run time is reported, the others go on
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"[ours] {name}: {type(exc).__name__}: {exc}")
            return
        timed.pop("image").save(Path(args.images) / f"ours-{name}.png")
        result["variants"][name] = timed
        log(f"[ours] {name}: {timed['total_median_s']} s per image, DiT step {timed['dit_step_median_s']} s, "
            f"peak {timed['peak_vram_gib']} GiB")

    for backend in (CUDA_BACKENDS if device.startswith("cuda") else CPU_BACKENDS):
        try:
            dit.set_attention_backend(backend)
        except Exception as exc:  # not installed or not usable on this device
            result["variants"][backend] = {"unavailable": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        measure(backend)
    dit.set_attention_backend("native")
    from diffusers.hooks import FirstBlockCacheConfig

    dit.enable_cache(FirstBlockCacheConfig(threshold=FBCACHE_THRESHOLD))  # the opt-in, lossy speed-up
    measure(f"native-fbcache-{FBCACHE_THRESHOLD}")
    dit.disable_cache()
    pipe.compile_transformer(backend=args.compile_backend)
    measure(f"native-compiled-{args.compile_backend}")
    result["rows_tokens"] = rows[-1] if rows else None
    return result


def child_reference(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(args.reference).resolve()))
    from internvlu import InternVLUPipeline

    device = args.device
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = InternVLUPipeline.from_pretrained(args.ckpt, torch_dtype=torch.bfloat16).to(device)
    result: dict = {"load_s": round(time.perf_counter() - start, 3)}
    step = pipe.scheduler.step
    hooks: dict = {}

    def scheduler_step(*a, **kw):
        output = step(*a, **kw)
        hooks["callback"]()
        return output

    pipe.scheduler.step = scheduler_step

    def call(step_callback):
        hooks["callback"] = step_callback
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return pipe(PROMPT, generation_mode="image", height=args.size, width=args.size,
                        num_inference_steps=args.steps, generator=generator).images[0]

    timed = timed_calls(torch, device, call, args.runs, args.warmup)
    timed.pop("image").save(Path(args.images) / "reference.png")
    result.update(timed)
    log(f"[reference] {timed['total_median_s']} s per image, DiT step {timed['dit_step_median_s']} s, "
        f"peak {timed['peak_vram_gib']} GiB")
    return result


def _run_child(kind: str, args, ckpt: Path, images: Path) -> dict:
    site = args.reference_site if kind == "reference" else args.ours_site
    paths = [str(Path(p).resolve()) for p in (site,) if p] + ([str(REPO)] if kind == "ours" else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(paths)
    python = args.reference_python if kind == "reference" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--child", kind, "--ckpt", str(ckpt), "--images", str(images),
           "--device", args.device, "--size", str(args.size), "--steps", str(args.steps), "--runs", str(args.runs),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--compile-backend", args.compile_backend]
    if args.reference:
        cmd += ["--reference", str(args.reference)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    if done.returncode != 0:
        return {"error": f"the {kind} process exited with code {done.returncode} (its log is above)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------
def matmul_tflops(device: str) -> float | None:
    """bf16 matrix-multiply rate measured here (8192³, ten products after three warm-ups)."""
    import torch

    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def dit_flops(rows_tokens: list[int], dit: dict, steps: int) -> float:
    """FLOPs of the DiT blocks for one call: per layer and token 26·D² in the projections and MLP
    (q and gate 2D², k, v, out D² each, MLP 8D²), per layer and row 4·L²·D in the attention."""
    width = dit["num_attention_heads"] * dit["attention_head_dim"]
    per_layer = sum(26 * width**2 * n + 4 * n * n * width for n in rows_tokens)
    return per_layer * dit["num_layers"] * steps


def image_difference(a: Path, b: Path) -> dict | None:
    import numpy as np
    from PIL import Image

    if not (a.is_file() and b.is_file()):
        return None
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return {"shape_mismatch": [list(x.shape), list(y.shape)]}
    diff = np.abs(x - y)
    return {"mean_levels": round(float(diff.mean()), 3), "max_levels": int(diff.max())}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU fallback at tiny sizes, even where CUDA is present")
    p.add_argument("--reference", type=Path, default=None, help="folder holding the official internvlu/ package")
    p.add_argument("--reference-site", default=None, help="folder with the reference's packages, first on its path")
    p.add_argument("--reference-python", default=sys.executable, help="interpreter for the reference")
    p.add_argument("--ours-site", default=None, help="folder with packages for our side, first on its path")
    p.add_argument("--cache", type=Path, default=Path("/tmp/internvlu-gpu-check"), help="checkpoint cache (CUDA)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for gpu-check.json and three images: ours (native), ours compiled, the reference")
    p.add_argument("--images", type=Path, default=None, help="folder for every variant's image (default: in --cache)")
    p.add_argument("--size", type=int, default=None, help="image side (default 1024 on CUDA, 64 on the CPU)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 on CUDA, 2 on the CPU)")
    p.add_argument("--runs", type=int, default=2, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor on CUDA, eager on CPU)")
    p.add_argument("--ladder", choices=("on", "off", "only"), default="on",
                   help="also run the quantisation and offload ladder (each mode's peak VRAM, time, drift "
                        "against bf16; bench/gpu_quant_check.py); 'only': just the ladder")
    p.add_argument("--lora", choices=("on", "off", "only"), default="on",
                   help="one LoRA training step (bench/lora.py): on, off, or only that")
    p.add_argument("--child", choices=("ours", "reference"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = child_ours(args) if args.child == "ours" else child_reference(args)
        print(json.dumps(result))
        return 0
    import torch

    args.device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cuda = args.device == "cuda"
    args.size = args.size or (1024 if cuda else 64)
    args.steps = args.steps or (20 if cuda else 2)
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "eager")
    started = time.perf_counter()
    out = args.out or (BENCH / "results" / f"gpu-check-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    images = args.images or args.cache / "images"
    for folder in (out, images):
        folder.mkdir(parents=True, exist_ok=True)
    if args.ours_site:  # the checkpoint build runs our code in a subprocess: it needs our packages too
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(Path(args.ours_site).resolve())] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if cuda:
        ckpt = ensure_checkpoint("all", say=log, cache=args.cache, dtype="bfloat16")
        log(f"checkpoint ready after {time.perf_counter() - started:.0f} s: {ckpt}")
    else:
        ckpt = TINY_CHECKPOINT
    doc: dict = {
        "schema": "internvl-u-gpu-check/1",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "config": {"checkpoint": str(ckpt), "size": args.size, "steps": args.steps, "runs": args.runs,
                   "warmup": args.warmup, "dtype": "bfloat16", "compile_backend": args.compile_backend,
                   "prompt": PROMPT},
        "matmul_tflops": matmul_tflops(args.device),
    }
    if args.ladder == "only" or args.lora == "only":
        doc["ours"] = doc["reference"] = {"skipped": f"--{'ladder' if args.ladder == 'only' else 'lora'} only"}
    else:
        doc["ours"] = _run_child("ours", args, ckpt, images)
        (out / "gpu-check.json").write_text(json.dumps(doc, indent=2))  # partial results survive a timeout
        doc["reference"] = _run_child("reference", args, ckpt, images) if args.reference else {
            "skipped": "no --reference folder given"}
    baseline = images / "ours-native.png"
    doc["image_differences"] = {
        name: image_difference(images / f"ours-{name}.png", baseline)
        for name, v in doc["ours"].get("variants", {}).items() if name != "native" and "total_s" in v
    }
    doc["image_differences"]["reference"] = image_difference(images / "reference.png", baseline)
    for name in ("ours-native.png", f"ours-native-compiled-{args.compile_backend}.png", "reference.png"):
        if (images / name).is_file() and images.resolve() != out.resolve():
            shutil.copyfile(images / name, out / name)
    rows, dit = doc["ours"].get("rows_tokens"), doc["ours"].get("dit")
    if rows and dit:
        flops = dit_flops(rows, dit, args.steps)
        doc["dit_flops"] = {"rows_tokens": rows, "tflop_per_call": float(f"{flops / 1e12:.4g}")}
        if doc["matmul_tflops"]:
            doc["dit_flops"]["floor_s"] = round(flops / (doc["matmul_tflops"] * 1e12), 4)
    if args.ladder != "off" and args.lora != "only":  # the quantisation and offload ladder (bench/gpu_quant_check.py)
        (out / "gpu-check.json").write_text(json.dumps(doc, indent=2))
        doc["ladder"] = run_ladder(args.device, ckpt, out / "ladder", args.threads, site=args.ours_site)
    if args.lora != "off" and args.ladder != "only":
        (out / "gpu-check.json").write_text(json.dumps(doc, indent=2))
        doc["lora"] = run_lora_step(args, ckpt, out)
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "gpu-check.json").write_text(json.dumps(doc, indent=2))
    print(markdown(doc))
    log(f"wrote {out / 'gpu-check.json'} in {doc['wall_s']} s")
    failed = "error" in doc["ours"] or "error" in doc["reference"] or "error" in doc.get("lora", {})
    return 1 if failed else 0


def run_lora_step(args, ckpt: Path, out: Path) -> dict:
    """``bench/lora.py`` in its own process: 1024², bf16, gradient checkpointing on CUDA; the tiny CPU path else."""
    cuda = args.device == "cuda"
    result = out / "lora.json"
    command = [sys.executable, str(BENCH / "lora.py"), "--ckpt", str(ckpt), "--json", str(result),
               "--device", args.device, "--size", str(1024 if cuda else 64),
               "--dtype", "bfloat16" if cuda else "float32", "--gradient-checkpointing", "on",
               "--steps", "3" if cuda else "1", "--warmup", "1", "--threads", str(args.threads)]
    env = dict(os.environ)
    if args.ours_site:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.ours_site).resolve()), str(REPO)]
                                            + [p for p in [env.get("PYTHONPATH")] if p])
    log("LoRA training step: " + " ".join(command[1:]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0 or not result.is_file():
        return {"error": done.stderr[-2000:]}
    return json.loads(result.read_text())


def markdown(doc: dict) -> str:
    floor = doc.get("dit_flops", {}).get("floor_s")
    lines = [f"{doc['device']}, torch {doc['torch']}, {doc['config']['size']}², {doc['config']['steps']} steps, "
             f"bfloat16; matmul {doc['matmul_tflops'] and round(doc['matmul_tflops'])} TFLOP/s; DiT "
             f"{doc.get('dit_flops', {}).get('tflop_per_call')} TFLOP per call, floor {floor} s",
             "", "| variant | s per image (median) | DiT s per step | DiT time / floor | peak VRAM GiB | vs ours-native (levels) |",
             "|---|---:|---:|---:|---:|---|"]
    variants = dict(doc["ours"].get("variants", {}))
    variants["reference"] = doc["reference"]
    for name, v in variants.items():
        if "total_s" not in v:
            reason = v.get("unavailable") or v.get("error") or v.get("skipped") or ""
            lines.append(f"| {name} | {reason[:80]} | | | | |")
            continue
        steps = v["dit_step_median_s"]
        ratio = f"{steps * doc['config']['steps'] / floor:.1f}×" if steps and floor else ""
        diff = doc["image_differences"].get(name)
        diff_text = f"{diff['mean_levels']} / {diff['max_levels']}" if diff and "mean_levels" in diff else ""
        lines.append(f"| {name} | {v['total_median_s']} | {steps} | {ratio} | {v['peak_vram_gib']} | {diff_text} |")
    if "ladder" in doc:
        lines += ["", "Quantisation and offload ladder:", "", ladder_markdown(doc["ladder"])]
    lora = doc.get("lora")
    if lora and "error" not in lora:
        lines += ["", f"LoRA training step: {lora['size']}², {lora['dtype']}, DiT {lora['dit']['layers']} layers × "
                  f"{lora['dit']['dim']}, rank {lora['rank']}, gradient checkpointing {lora['gradient_checkpointing']}: "
                  f"{lora['step_median_s']} s per step, peak {lora['peak_memory_gib']} GiB ({lora['memory_kind']})"]
    elif lora:
        lines += ["", f"LoRA training step failed: {lora['error'][-300:]}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
