"""One LoRA training step: time and peak memory (``internvl-u train-lora``'s inner loop).

CPU (default): the bench checkpoint (``bench/checkpoint.py``: released widths, ``--layers`` layers),
float32. CUDA (``--device cuda``, what ``bench/gpu_check.py`` runs): bfloat16 weights under
accelerate's bf16 autocast, gradient checkpointing on, 1024², the released depths. One sample is
cached (VLM hidden states and VAE latents) exactly as the trainer does, then ``--warmup`` untimed
and ``--steps`` timed optimiser steps of the real objective run on the DiT's LoRA.

    python bench/lora.py                          # CPU, 2 layers, 512², writes bench/results/lora-cpu.json
    python bench/lora.py --device cuda --layers all --size 1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from checkpoint import ensure_checkpoint  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(checkpoint: Path, *, size: int, device: str, dtype: str, rank: int, steps: int, warmup: int,
            gradient_checkpointing: bool, threads: int) -> dict:
    """Load, cache one sample, add the LoRA, run optimiser steps; times and memory."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig
    from PIL import Image

    from internvl_u_core import InternVLUPipeline, lora, training

    torch.set_num_threads(threads)
    load_at_start = os.getloadavg()[0]
    cuda = device.startswith("cuda")
    weight_dtype = getattr(torch, dtype)
    accelerator = Accelerator(mixed_precision="bf16" if cuda and weight_dtype == torch.bfloat16 else "no", cpu=not cuda)
    started = time.perf_counter()
    pipe = InternVLUPipeline.from_pretrained(checkpoint, torch_dtype=weight_dtype, device=device)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "sample.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(image)
        started = time.perf_counter()
        sample = training.encode_sample(pipe, training.Sample(image, "a photograph of a red fox in the snow"), size)
        cache_s = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    else:
        before = _rss_gib()
    dit = pipe.generation_decoder.decoder
    pipe.generation_decoder.requires_grad_(False)
    torch.manual_seed(0)
    dit.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora.DEFAULT_TARGETS)),
                    adapter_name=training.TRAINEE)
    trainable = [p for n, p in dit.named_parameters() if "lora_" in n]
    for parameter in trainable:
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    if gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    optimizer = accelerator.prepare(torch.optim.AdamW(trainable, lr=1e-4))
    generator = torch.Generator().manual_seed(0)
    times, losses = [], []
    dit.train()
    for index in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        tick = time.perf_counter()
        sigma = training.draw_sigmas(1, generator, 3.0)
        noise = torch.randn((1, *sample.latents.shape), generator=generator)
        with accelerator.autocast():
            loss = training.flow_matching_loss(pipe, [sample], [training.ROW_FULL], sigma, noise)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - tick)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else _rss_gib()
    config = dit.config
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "checkpoint": str(checkpoint),
        "dit": {"layers": config.num_layers, "dim": config.num_attention_heads * config.attention_head_dim},
        "size": size, "dtype": dtype, "rank": rank, "gradient_checkpointing": gradient_checkpointing,
        "threads": threads, "image_tokens": int(sample.latents.shape[-1] * sample.latents.shape[-2] // 4),
        "trainable_params": sum(p.numel() for p in trainable),
        "adapter_mib_fp32": round(sum(p.numel() for p in trainable) * 4 / 2**20, 2),
        "load_s": round(load_s, 2), "cache_sample_s": round(cache_s, 3),
        "step_s": [round(t, 4) for t in times], "step_median_s": round(statistics.median(times), 4),
        "losses": [round(v, 5) for v in losses],
        # CUDA: allocated GiB (model + LoRA + optimiser + activations); CPU: the process's peak RSS.
        "memory_before_training_gib": round(before, 3), "peak_memory_gib": round(peak, 3),
        "memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "load_average": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # a busy machine slows the steps
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/lora.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default: the bench checkpoint)")
    p.add_argument("--layers", default="2", help="bench checkpoint layers per part ('all': released depths)")
    p.add_argument("--vocab", type=int, default=None, help="LLM vocabulary of the bench checkpoint (None: released)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="auto: on with CUDA")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    p.add_argument("--json", type=Path, default=None, help="results file (default: bench/results/lora-<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = args.ckpt or ensure_checkpoint(args.layers, say=log, vocab=args.vocab)
    checkpointing = args.gradient_checkpointing == "on" or (
        args.gradient_checkpointing == "auto" and args.device.startswith("cuda"))
    result = measure(checkpoint, size=args.size, device=args.device, dtype=args.dtype, rank=args.rank,
                     steps=args.steps, warmup=args.warmup, gradient_checkpointing=checkpointing,
                     threads=args.threads)
    out = args.json or BENCH / "results" / f"lora-{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"| {result['device']} | {result['size']}² | {result['dtype']} | DiT {result['dit']['layers']}×"
          f"{result['dit']['dim']} | rank {result['rank']} | checkpointing {result['gradient_checkpointing']} | "
          f"{result['step_median_s']} s/step | peak {result['peak_memory_gib']} GiB ({result['memory_kind']}) |")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
