"""Loading and time to first image, side by side: ``python bench/load.py`` (see bench/README.md).

Every measurement is a fresh process, so nothing is cached in Python between runs (the page cache
is warm: the checkpoint files are read once before the first run). Two processes per round:

* *warm libraries*: imports the libraries every loader needs first (transformers' Qwen3, diffusers'
  Qwen-Image VAE, the core package), then times ``InternVLUPipeline.from_pretrained`` alone: the
  loader's own work, as in an application that already has those libraries loaded (ComfyUI, a server);
* *fresh process*: times ``from_pretrained`` from a bare interpreter (library imports included),
  then two identical text-to-image calls (the first pays for paging in memory-mapped weights and
  one-time kernel setup): what a user waits for from start to first image.

Variants (``--compare-commits``) and dtypes alternate run by run, so drift on a shared machine
hits all alike.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from checkpoint import REPO, ensure_checkpoint  # noqa: E402
from worker import _gib, current_rss_bytes  # noqa: E402

RESULTS = BENCH / "results"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
LIBRARIES = (
    "transformers.models.qwen3.modeling_qwen3",
    "diffusers.models.autoencoders.autoencoder_kl_qwenimage",
    "internvl_u_core",
)
METRICS = ("torch_s", "libraries_s", "load_s", "cold_load_s", "first_image_s", "second_image_s", "cold_start_s",
           "rss_after_load_gib")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The measured process
# ----------------------------------------------------------------------------------------------
def child(args) -> None:
    """One measurement; ``--child cold`` starts from a bare interpreter, ``--child warm`` imports the libraries first."""
    start = time.perf_counter()
    import importlib

    import torch

    result = {"torch_s": time.perf_counter() - start}
    torch.set_num_threads(args.threads)
    if args.child == "warm":
        t0 = time.perf_counter()
        for name in LIBRARIES:
            importlib.import_module(name)
        result["libraries_s"] = time.perf_counter() - t0

    from internvl_u_core import InternVLUPipeline

    t0 = time.perf_counter()
    pipe = InternVLUPipeline.from_pretrained(args.ckpt, torch_dtype=args.dtype, device=args.device)
    _sync(torch, args.device)
    result["load_s" if args.child == "warm" else "cold_load_s"] = time.perf_counter() - t0
    result["rss_after_load_gib"] = _gib(current_rss_bytes())
    if args.child == "cold" and args.images:
        for key in ("first_image_s", "second_image_s"):
            t0 = time.perf_counter()
            pipe.generate(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=0)
            _sync(torch, args.device)
            result[key] = time.perf_counter() - t0
        result["cold_start_s"] = result["cold_load_s"] + result["first_image_s"]
    import internvl_u_core

    result["core_file"] = internvl_u_core.__file__
    print(json.dumps(result))


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# The parent: variants, interleaving, summary
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/load.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", default="4", help="layers in each of ViT, LLM and DiT; 'all' = released 24/28/20")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch_dtype values")
    p.add_argument("--compare-commits", nargs="+", default=["."], metavar="REV",
                   help="git revisions to compare ('.' = the working tree)")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per variant and dtype")
    p.add_argument("--size", type=int, default=256, help="image width = height")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of each image")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the measured process")
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="skip the two images of the fresh process (load times only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="result file (default bench/results/load-<time>.json)")
    p.add_argument("--show", type=Path, default=None, help="print the table of an earlier result file and exit")
    p.add_argument("--child", choices=("cold", "warm"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _variants(revs: list[str]) -> list[dict]:
    from run import worktree_for

    variants = []
    for rev in revs:
        if rev == ".":
            variants.append({"name": "worktree", "rev": rev, "code": str(REPO)})
        else:
            path, sha, subject = worktree_for(rev)
            variants.append({"name": sha[:8], "rev": rev, "code": str(path), "subject": subject})
    return variants


def _run_child(args, variant: dict, dtype: str, ckpt: Path, kind: str) -> dict:
    from run import child_env

    env = child_env(variant["code"], args.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--ckpt", str(ckpt), "--dtype", dtype,
           "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
    if not args.images:
        cmd.append("--no-images")
    done = subprocess.run(cmd, env=env, cwd=variant["code"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant['name']} {dtype}: the measured process failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["core_file"]).resolve().is_relative_to(Path(variant["code"]).resolve()):
        log(f"WARNING: {variant['name']} imported internvl_u_core from {result['core_file']}")
    return result


def summarise(runs: list[dict]) -> dict:
    out = {}
    for metric in METRICS:
        values = [r[metric] for r in runs if r.get(metric) is not None]
        if values:
            out[metric] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return out


def markdown(doc: dict) -> str:
    labels = {"libraries_s": "libraries import (s)", "load_s": "from_pretrained, libraries imported (s)",
              "cold_load_s": "from_pretrained in a fresh process (s)", "first_image_s": "first image (s)",
              "second_image_s": "second image (s)", "cold_start_s": "fresh process: load + first image (s)",
              "rss_after_load_gib": "RSS after load (GiB)"}
    names = [v["name"] for v in doc["variants"]]
    lines = ["| dtype | metric | " + " | ".join(f"{n} median (min)" for n in names) + " |",
             "|---|---|" + "---:|" * len(names)]
    for dtype, per_variant in doc["summary"].items():
        for metric, label in labels.items():
            cells = []
            for name in names:
                s = per_variant.get(name, {}).get(metric)
                cells.append("" if s is None else f"{s['median']:.2f} ({s['min']:.2f})")
            lines.append(f"| {dtype} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.show:
        print(markdown(json.loads(args.show.read_text())))
        return 0
    ckpt = ensure_checkpoint(args.layers, say=log)
    for file in sorted(ckpt.rglob("*.safetensors")):  # warm the page cache once
        with open(file, "rb") as fh:
            while fh.read(64 << 20):
                pass
    variants = _variants(args.compare_commits)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    started = _dt.datetime.now().isoformat(timespec="seconds")
    load_start = os.getloadavg()
    runs: dict[str, dict[str, list[dict]]] = {d: {v["name"]: [] for v in variants} for d in dtypes}
    for repeat in range(args.repeats):
        for dtype in dtypes:
            for variant in variants:
                warm = _run_child(args, variant, dtype, ckpt, "warm")
                cold = _run_child(args, variant, dtype, ckpt, "cold")
                runs[dtype][variant["name"]].append({**cold, **warm})
                images = (f", first image {cold['first_image_s']:.2f} s, second {cold['second_image_s']:.2f} s"
                          if args.images else "")
                log(f"[{repeat + 1}/{args.repeats}] {variant['name']:>8} {dtype:>8}: libraries "
                    f"{warm['libraries_s']:.2f} s + load {warm['load_s']:.2f} s | fresh process: load "
                    f"{cold['cold_load_s']:.2f} s{images}")
    import torch

    doc = {
        "schema": "internvl-u-bench-load/1",
        "created": started,
        "command": "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {"layers": args.layers, "size": args.size, "steps": args.steps, "threads": args.threads,
                   "device": args.device, "repeats": args.repeats, "checkpoint": str(ckpt)},
        "machine": {"torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "variants": variants,
        "summary": {d: {name: summarise(r) for name, r in per.items()} for d, per in runs.items()},
        "runs": runs,
    }
    path = args.json or RESULTS / f"load-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    print(markdown(doc))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
