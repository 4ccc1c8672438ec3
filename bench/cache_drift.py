"""How far diffusers' first-block cache moves the images, and how much time it saves: ``python bench/cache_drift.py``.

The cache is an opt-in, lossy speed-up (docs/diffusion-transformer.md). For each prompt the exact
image is drawn first, then the same call with the cache at each threshold, in one process with
the bench checkpoint loaded once. Reported per threshold: how many of the steps ran every block
(the others reused the cached residual after the first block), the time against the exact call,
and the pixel difference from the exact image (mean and max grey levels, PSNR). It also reports the quantity the cache compares
with its threshold, the relative change of the first block's residual between steps: with random
weights it is large (the modulation changes with every timestep), so only large thresholds skip
steps here; trained weights change far less from step to step.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from checkpoint import ensure_checkpoint  # noqa: E402

RESULTS = BENCH / "results"
PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen with a soft egg, studio photograph",
    "an isometric pixel-art city block at night",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/cache_drift.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", default="4", help="layers in each of ViT, LLM and DiT; 'all' = released 24/28/20")
    p.add_argument("--thresholds", default="0.05,0.2,1,1.5,2", help="first-block cache thresholds to try")
    p.add_argument("--prompts", type=int, default=3, help=f"how many of the {len(PROMPTS)} fixed prompts")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="result file (default bench/results/cache-drift-<time>.json)")
    return p.parse_args(argv)


def difference(a, b) -> dict:
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    err = np.abs(x - y)
    mse = float((err**2).mean())
    return {"mean_levels": round(float(err.mean()), 3), "max_levels": int(err.max()),
            "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from diffusers.hooks import FirstBlockCacheConfig

    from internvl_u_core import InternVLUPipeline

    torch.set_num_threads(args.threads)
    ckpt = ensure_checkpoint(args.layers, say=log)
    pipe = InternVLUPipeline.from_pretrained(ckpt, torch_dtype=args.dtype, device=args.device)
    dit = pipe.generation_decoder.decoder
    tail = dit.transformer_blocks[-1]
    full_steps = {"count": 0}
    tail_forward = tail.forward

    def counting_forward(*a, **kw):  # the cache hook calls this only when every block runs
        full_steps["count"] += 1
        return tail_forward(*a, **kw)

    tail.forward = counting_forward
    head = dit.transformer_blocks[0]
    head_forward = head.forward
    residuals: list = []

    def recording_forward(hidden_states, *a, **kw):  # the quantity the cache thresholds, per step
        out = head_forward(hidden_states, *a, **kw)
        residuals.append((out[0] - hidden_states).float())
        return out

    head.forward = recording_forward

    def draw(prompt: str):
        full_steps["count"] = 0
        residuals.clear()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        image = pipe.generate(prompt, width=args.size, height=args.size, steps=args.steps, seed=0)[0]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return image, time.perf_counter() - start, full_steps["count"]

    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    draw(PROMPTS[0])  # warm-up
    rows: dict[str, list[dict]] = {str(t): [] for t in thresholds}
    changes = []
    for prompt in PROMPTS[: args.prompts]:
        exact, exact_s, _ = draw(prompt)
        # FirstBlockCache skips a step when mean|r_t - r_{t-1}| / mean|r_{t-1}| of this residual is below the threshold.
        changes += [((b - a).abs().mean() / a.abs().mean()).item() for a, b in zip(residuals, residuals[1:])]
        for threshold in thresholds:
            dit.enable_cache(FirstBlockCacheConfig(threshold=threshold))
            image, seconds, full = draw(prompt)
            dit.disable_cache()
            row = {"prompt": prompt, "full_steps": full, "time_ratio": round(seconds / exact_s, 3),
                   **difference(image, exact)}
            rows[str(threshold)].append(row)
            log(f"threshold {threshold}: {row}")
    summary = {
        t: {"full_steps_median": statistics.median(r["full_steps"] for r in runs),
            "time_ratio_median": statistics.median(r["time_ratio"] for r in runs),
            "mean_levels_max": max(r["mean_levels"] for r in runs),
            "max_levels_max": max(r["max_levels"] for r in runs)}
        for t, runs in rows.items()
    }
    changes.sort()
    doc = {"first_block_change": {"min": changes[0], "median": statistics.median(changes), "max": changes[-1]}}
    log(f"relative change of the first block's residual between steps: {doc['first_block_change']}")
    doc |= {"schema": "internvl-u-cache-drift/1", "created": _dt.datetime.now().isoformat(timespec="seconds"),
           "command": "python bench/cache_drift.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "config": {k: v for k, v in vars(args).items() if k != "json"} | {"checkpoint": str(ckpt)},
           "torch": torch.__version__, "summary": summary, "runs": rows}
    path = args.json or RESULTS / f"cache-drift-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"| threshold | steps with every block (of {args.steps}) | time vs exact | mean levels (worst prompt) "
          "| max levels (worst prompt) |\n|---:|---:|---:|---:|---:|")
    for t, s in summary.items():
        print(f"| {t} | {s['full_steps_median']} | {s['time_ratio_median']:.2f}× | {s['mean_levels_max']} | "
              f"{s['max_levels_max']} |")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
