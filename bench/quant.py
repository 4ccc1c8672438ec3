"""Quantisation modes side by side: ``python bench/quant.py`` (see bench/README.md, "Quantisation").

One command measures, for full precision and every mode this device runs, on the bench checkpoint:

* **time per job, decode tokens/s and peak RSS**: ``bench/run.py --compare-settings default <modes>``
  (one process per job and mode, interleaved runs, medians; ``--isolate`` by default so only one
  model is in memory at a time);
* **drift against the exact float32 pipeline**: images of a fixed text-to-image and edit job (max and
  mean absolute difference in 8-bit levels, PSNR), and the first answer token's logits over a fixed
  set of questions (cosine, KL divergence from float32); each mode in its own process;
* **stored bytes per component**, the input of the README's memory table for the released model
  (``--memory-table``), with the library formats (torchao int8/fp8, bitsandbytes nf4 when installed)
  measured on the CPU as well, since they are the same tensors on a GPU.

Random weights have near-flat logits, so token agreement means little; the logit cosine and KL do.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from checkpoint import RELEASED_LAYERS, REPO, ensure_checkpoint, read_layers  # noqa: E402
from worker import INSTRUCTION, PROMPT, test_image  # noqa: E402

RESULTS = BENCH / "results"
CPU_MODES = ("int8", "bf16")
CUDA_MODES = ("int8", "fp8", "nf4", "bf16")
#: The fixed question set of the text drift (question, with the test picture?).
QUESTIONS = (
    ("Describe this picture in detail.", True),
    ("What colour is the disc in the image?", True),
    ("What is the capital of Portugal?", False),
    ("Write a haiku about the sea.", False),
    ("Explain in one sentence why the sky is blue.", False),
    ("A poster for a jazz night in Lisbon", False),
    ("List three uses of a paperclip.", False),
    ("Translate 'good morning' into German.", False),
)
#: The CUDA weight formats, applied on the CPU through the same quantisers to measure their drift there.
LIBRARY_FORMATS = {"torchao-int8": ("int8", "torchao"), "torchao-fp8": ("fp8", "torchao"),
                   "bnb-nf4": ("nf4", "bitsandbytes")}
#: Parameter groups of the memory table; the *_layers/_blocks ones scale with the layer count.
GROUPS = ("vit_layers", "llm_embedding", "llm_head", "llm_layers", "dit_blocks", "other", "vae")
SCALED = {"vit_layers": "vit", "llm_layers": "llm", "dit_blocks": "dit"}
#: Groups the quantisation modes change (the ViT, the embedding/tied head and the small parts never).
QUANTISED = ("llm_layers", "dit_blocks")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Child process: one mode's outputs and bytes
# ----------------------------------------------------------------------------------------------
def group_modules(pipe) -> dict:
    """The modules of each parameter group; a head tied to the embedding counts under the embedding."""
    vlm, decoder = pipe.vlm, pipe.generation_decoder
    llm, dit = vlm.language_model, decoder.decoder
    tied = getattr(llm.lm_head, "weight", None) is llm.model.embed_tokens.weight
    return {
        "vit_layers": [vlm.vision_model.encoder.layers],
        "llm_embedding": [llm.model.embed_tokens],
        "llm_head": [] if tied else [llm.lm_head],
        "llm_layers": [llm.model.layers],
        "dit_blocks": [dit.transformer_blocks],
        "other": [vlm.vision_model.embeddings, vlm.mlp1, vlm.special_token_embedding, llm.model.norm]
        + [m for name, m in dit.named_children() if name != "transformer_blocks"]
        + [m for name, m in decoder.named_children() if name != "decoder"],
        "vae": [pipe.vae],
    }


def _direct_parameters(pipe) -> list:
    """Parameters held by the generation decoder itself (the padding token), part of "other"."""
    return [p for p in pipe.generation_decoder._parameters.values() if p is not None]


def group_bytes(pipe) -> dict:
    from internvl_u_core.quantization import module_bytes, tensor_bytes

    out = {name: sum(module_bytes(m) for m in modules) for name, modules in group_modules(pipe).items()}
    out["other"] += sum(tensor_bytes(p) for p in _direct_parameters(pipe))
    return out


def group_params(pipe) -> dict:
    """Parameter counts per group of a full-precision pipeline (shared tensors once)."""
    out = {}
    for name, modules in group_modules(pipe).items():
        out[name] = sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())
    out["other"] += sum(p.numel() for p in _direct_parameters(pipe))
    return out


def child(args) -> int:
    """Load one mode, run the fixed jobs, save images and logits into ``args.out``; print bytes."""
    import numpy as np
    import torch

    from internvl_u_core import InternVLUPipeline

    torch.set_num_threads(args.threads)
    mode = None if args.mode in ("float32", *LIBRARY_FORMATS) else args.mode
    pipe = InternVLUPipeline.from_pretrained(args.ckpt, torch_dtype=args.dtype, device=args.device, quantization=mode)
    note = None
    if args.mode in LIBRARY_FORMATS:
        note = apply_library_format(pipe, args.mode, args.device)
    picture = test_image(args.size)
    t2i = pipe.generate(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=0)[0]
    edit = pipe.edit(picture, INSTRUCTION, width=args.size, height=args.size, steps=args.steps, seed=0)[0]
    out = Path(args.out)
    np.save(out / f"{args.mode}-t2i.npy", np.asarray(t2i))
    np.save(out / f"{args.mode}-edit.npy", np.asarray(edit))
    logits = torch.stack([pipe.next_token_logits(q, picture if with_image else None) for q, with_image in QUESTIONS])
    torch.save(logits, out / f"{args.mode}-logits.pt")
    info = {"mode": args.mode, "backend": pipe.quantization.backend if pipe.quantization else "float32",
            "bytes": group_bytes(pipe), "model_bytes": pipe.model_size_bytes(), "note": note}
    if mode is None:
        info["params"] = group_params(pipe)
        info["library_bytes_per_param"] = library_bytes_per_param(pipe)
    print(json.dumps(info))
    return 0


def apply_library_format(pipe, name: str, device: str) -> str | None:
    """Quantise a loaded pipeline in a CUDA format through the libraries' quantisers, here on ``device``.

    Measures what the weight format alone does (drift against float32 computing in float32). Returns a
    note when only part of the model could be quantised on this device.
    """
    import torch

    from internvl_u_core import quantization as q

    mode, backend = LIBRARY_FORMATS[name]
    plan = q.QuantizationPlan(mode, torch.device(device), backend, pipe.dtype)
    q.quantize_language_model(pipe.vlm, plan)
    pipe.quantization = plan
    if backend == q.BITSANDBYTES and device == "cpu":
        return "LLM only: diffusers' bitsandbytes quantiser needs a GPU for the DiT"
    q.quantize_generation_decoder(pipe.generation_decoder, plan)
    return None


def library_bytes_per_param(pipe) -> dict:
    """Bytes per parameter of the LLM layers and DiT blocks in the CUDA formats, quantised here on the CPU.

    torchao's tensors (and bitsandbytes' when it is installed and runs on this CPU) are the ones a GPU
    holds. Each mode quantises a deep copy of one LLM layer and one DiT block through the same calls
    the pipeline uses on CUDA.
    """
    import copy
    import importlib.util

    import torch

    from internvl_u_core import quantization as q

    out: dict = {}
    layer = pipe.vlm.language_model.model.layers[0]
    block = pipe.generation_decoder.decoder.transformer_blocks[0]
    formats = []
    if importlib.util.find_spec("torchao") is not None:
        formats += [("int8", q.TORCHAO), ("fp8", q.TORCHAO)]
    if importlib.util.find_spec("bitsandbytes") is not None:
        formats.append(("nf4", q.BITSANDBYTES))
    for mode, backend in formats:
        plan = q.QuantizationPlan(mode, torch.device("cpu"), backend, torch.bfloat16)
        try:
            sizes = {}
            for name, module in (("llm_layers", layer), ("dit_blocks", block)):
                quantized = _quantize_linears(copy.deepcopy(module).to(torch.bfloat16), plan)
                params = sum(p.numel() for p in module.parameters())
                sizes[name] = q.module_bytes(quantized) / params
            out[mode] = {"backend": backend, **sizes}
        except Exception as exc:  # a format this CPU cannot build is reported, not fatal
            out[mode] = {"backend": backend, "error": f"{type(exc).__name__}: {exc}"}
    return out


def _quantize_linears(module, plan):
    """Every ``nn.Linear`` of ``module`` in the plan's library format (what the quantisers produce)."""
    from torch import nn

    from internvl_u_core import quantization as q

    if plan.backend == q.TORCHAO:
        from torchao.quantization import quantize_

        quantize_(module, q.torchao_config(plan.mode))
        return module
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, child_module in list(parent.named_children()):
            if type(child_module) is nn.Linear:
                packed = bnb.nn.Linear4bit(child_module.in_features, child_module.out_features,
                                           bias=child_module.bias is not None, quant_type="nf4",
                                           compute_dtype=plan.dtype)
                # compress_statistics=False: no double quantisation, as BitsAndBytesConfig's default.
                packed.weight = bnb.nn.Params4bit(child_module.weight.data, requires_grad=False, quant_type="nf4",
                                                  compress_statistics=False)
                packed.bias = child_module.bias
                setattr(parent, name, packed.to(plan.device))
    return module


# ----------------------------------------------------------------------------------------------
# Parent: drift, timing, table
# ----------------------------------------------------------------------------------------------
def image_drift(a, b) -> dict:
    import numpy as np

    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((diff**2).mean())
    return {"max_abs": float(diff.max()), "mean_abs": round(float(diff.mean()), 4),
            "psnr_db": None if mse == 0 else round(10 * np.log10(255**2 / mse), 2)}


def logit_drift(reference, other) -> dict:
    import torch

    cosine = torch.nn.functional.cosine_similarity(reference, other, dim=-1)
    kl = torch.nn.functional.kl_div(other.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean()
    return {"cosine_median": round(statistics.median(cosine.tolist()), 5), "cosine_min": round(cosine.min().item(), 5),
            "kl_median": round(statistics.median(kl.tolist()), 5), "kl_max": round(kl.max().item(), 5),
            "top1_agreement": round(top1.item(), 3)}


def measure_drift(args, ckpt: Path, modes: list[str]) -> dict:
    import numpy as np
    import torch

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="quant-drift-") as tmp:
        for mode in ["float32", *modes]:
            log(f"[drift] {mode}")
            cmd = [sys.executable, str(Path(__file__)), "--child", mode, "--ckpt", str(ckpt), "--out", tmp,
                   "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--device", args.device, "--dtype", args.dtype]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                log(done.stderr[-3000:])
                raise RuntimeError(f"drift child for {mode} failed")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        reference_logits = torch.load(Path(tmp) / "float32-logits.pt")
        for mode in modes:
            entry = results[mode]
            for job in ("t2i", "edit"):
                entry[f"{job}_drift"] = image_drift(np.load(Path(tmp) / f"float32-{job}.npy"),
                                                    np.load(Path(tmp) / f"{mode}-{job}.npy"))
            entry["text_drift"] = logit_drift(reference_logits, torch.load(Path(tmp) / f"{mode}-logits.pt"))
    return results


def measure_timing(args, modes: list[str], json_path: Path) -> dict:
    cmd = [sys.executable, str(BENCH / "run.py"), "--compare-settings", "default", *modes, "--jobs", args.jobs,
           "--repeats", str(args.repeats), "--size", str(args.size), "--steps", str(args.steps),
           "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
           "--layers", args.layers, "--json", str(json_path)]
    if args.isolate:
        cmd.append("--isolate")
    log("[timing] " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=False)
    return json.loads(json_path.read_text())


def timing_summary(doc: dict, modes: list[str]) -> dict:
    """Medians per mode and job, plus paired (round by round) ratios to float32."""
    out: dict = {}
    results = doc["results"]
    base = results.get("default", {})
    for name in ["default", *modes]:
        per_job = {}
        for job, slot in results.get(name, {}).items():
            summary = slot.get("summary", {})
            entry = {k: summary[k]["median"] for k in ("total_s", "decode_tok_s", "peak_rss_gib", "dit_step_s",
                                                       "llm_s", "vlm_s", "ttft_s", "rss_anon_end_gib",
                                                       "rss_file_end_gib", "model_gib") if k in summary}
            entry["runs"] = len(slot.get("runs", []))
            if name != "default":
                for metric in ("total_s", "decode_tok_s"):
                    rounds = paired_rounds(base.get(job, {}).get("runs", []), slot.get("runs", []), metric)
                    if rounds:
                        entry[f"paired_{metric}_ratio"] = round(statistics.median(rounds), 3)
                        entry[f"paired_{metric}_ratio_range"] = [round(min(rounds), 3), round(max(rounds), 3)]
            per_job[job] = entry
        out["float32" if name == "default" else name] = per_job
    return out


def paired_rounds(a_runs: list[dict], b_runs: list[dict], metric: str) -> list[float]:
    """``run_i(B) / run_i(A)`` of ``metric`` for every interleaved round (their median is report.paired_ratio)."""
    return [b[metric] / a[metric] for a, b in zip(a_runs, b_runs) if a.get(metric) and b.get(metric)]


def side_by_side(run_doc: dict) -> str:
    """Each mode of a ``run.py --compare-settings default MODE ...`` result against float32, with the spread.

    Decode tokens/s and total time: min / median / max over the timed runs, and the per-round
    ratio to float32 (runs are interleaved, so round i of both ran under the same load). Peak RSS
    is each job process's maximum (load included).
    """
    results = run_doc["results"]
    names = [v["name"] for v in run_doc["variants"]]
    machine = run_doc["machine"]
    lines = [f"CPU: {machine.get('cpu_model')} ({machine.get('cpu_capability', 'SIMD level not recorded')}), "
             f"{run_doc['config']['threads']} threads, load average {machine.get('loadavg_start')} → "
             f"{machine.get('loadavg_end')}",
             "",
             "| mode | job | runs | decode tok/s min / median / max | × float32 per round (median; min–max) | "
             "total s min / median / max | peak RSS GiB (× float32) |",
             "|---|---|---:|---|---|---|---|"]
    for name in names:
        for job, slot in results.get(name, {}).items():
            summary = slot.get("summary", {})
            base = results.get(names[0], {}).get(job, {})

            def spread(metric, summary=summary):
                s = summary.get(metric)
                return "–" if s is None else f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"

            ratio = "–"
            rounds = paired_rounds(base.get("runs", []), slot.get("runs", []), "decode_tok_s")
            if name != names[0] and rounds:
                median = report.paired_ratio(base.get("runs", []), slot.get("runs", []), "decode_tok_s")
                ratio = f"{median:.2f}× ({min(rounds):.2f}–{max(rounds):.2f})"
            peak = summary.get("peak_rss_gib", {}).get("max")
            base_peak = base.get("summary", {}).get("peak_rss_gib", {}).get("max")
            peak_text = "–" if peak is None else f"{peak:.2f}"
            if peak is not None and base_peak and name != names[0]:
                peak_text += f" ({peak / base_peak:.2f}×)"
            label = "float32" if name == "default" else name
            lines.append(f"| {label} | {job} | {len(slot.get('runs', []))} | {spread('decode_tok_s')} | {ratio} | "
                         f"{spread('total_s')} | {peak_text} |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    modes = ["float32", *doc["modes"]]
    timing, drift = doc.get("timing", {}), doc["drift"]
    lines = ["| mode | backend | weights (GiB) | t2i s | edit s | understand s | decode tok/s (× fp32) | cot s | "
             "peak RSS t2i / edit / understand (GiB) | understand RSS anonymous (GiB) | t2i max / mean / PSNR | edit max / mean / PSNR | "
             "logit cosine median (min) | KL median (max) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for mode in modes:
        t = timing.get(mode, {})
        d = drift.get(mode, {})

        def cell(job, metric, t=t, digits=2):
            value = t.get(job, {}).get(metric)
            return "–" if value is None else f"{value:.{digits}f}"

        decode = cell("understand", "decode_tok_s")
        ratio = t.get("understand", {}).get("paired_decode_tok_s_ratio")
        if ratio:
            decode += f" ({ratio:.2f}×)"
        rss = " / ".join(cell(job, "peak_rss_gib") for job in ("t2i", "edit", "understand"))
        anon = cell("understand", "rss_anon_end_gib")
        if mode == "float32":
            images = ["exact", "exact"]
            text = ["1", "0"]
        else:
            images = [f"{d[f'{j}_drift']['max_abs']:.0f} / {d[f'{j}_drift']['mean_abs']:.2f} / "
                      f"{d[f'{j}_drift']['psnr_db']} dB" for j in ("t2i", "edit")]
            td = d["text_drift"]
            text = [f"{td['cosine_median']:.4f} ({td['cosine_min']:.4f})", f"{td['kl_median']:.4f} ({td['kl_max']:.4f})"]
        backend = d.get("backend", "") + (f" ({d['note']})" if d.get("note") else "")
        lines.append(f"| {mode} | {backend} | {d.get('model_bytes', 0) / 2**30:.2f} | {cell('t2i', 'total_s')} | "
                     f"{cell('edit', 'total_s')} | {cell('understand', 'total_s')} | {decode} | {cell('cot', 'total_s')} | "
                     f"{rss} | {anon} | {images[0]} | {images[1]} | {text[0]} | {text[1]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Memory table for the released model
# ----------------------------------------------------------------------------------------------
def released_params(bench_params: dict, bench_layers: dict) -> dict:
    """Parameter counts per group of the released model: the bench checkpoint has its widths, so only
    the layer groups change, in proportion to the layer counts."""
    return {name: count * RELEASED_LAYERS[SCALED[name]] // bench_layers[SCALED[name]] if name in SCALED else count
            for name, count in bench_params.items()}


# GPU memory of the released model: weights from the measured bytes per parameter, activations from a
# CPU run at 1024² (halved: the GPU computes in bfloat16), the CUDA context assumed.
CUDA_CONTEXT_GIB = 0.5
PCIE_GB_S = 25.0  # PCIe 4.0 x16, what offloading moves weights over
CARDS_GIB = (8, 12, 16, 24)
GPU_MODES = ("bf16", "int8", "fp8", "nf4")
RUNGS = ("none", "model", "group", "sequential")


def gpu_bytes_per_param(doc: dict) -> dict:
    """mode -> group -> bytes per parameter on a GPU (bfloat16 everywhere but the quantised groups)."""
    library = doc["drift"]["float32"].get("library_bytes_per_param", {})
    out = {"bf16": dict.fromkeys(GROUPS, 2.0)}
    for mode in GPU_MODES[1:]:
        measured = library.get(mode, {})
        if all(isinstance(measured.get(g), float) for g in QUANTISED):
            out[mode] = {g: measured[g] if g in QUANTISED else 2.0 for g in GROUPS}
    return out


def memory_rows(doc: dict, activation_gib: float) -> list[dict]:
    """GPU memory per mode and offload rung for the released model at 1024² (GiB)."""
    params = doc["released_params"]
    rows = []
    for mode, per_param in gpu_bytes_per_param(doc).items():
        gib = {g: params[g] * per_param[g] / 2**30 for g in GROUPS}
        vlm = gib["vit_layers"] + gib["llm_embedding"] + gib["llm_head"] + gib["llm_layers"] + gib["other"]
        decoder = gib["dit_blocks"] + gib["other"]
        block = max(gib[g] / RELEASED_LAYERS[SCALED[g]] for g in SCALED)
        weights = sum(gib.values())
        # Bytes a step of the DiT moves over PCIe when its blocks stream (group, sequential).
        dit_move_s = gib["dit_blocks"] * 2**30 / 1e9 / PCIE_GB_S
        resident = {
            "none": weights,
            "model": max(vlm, decoder, gib["vae"]),
            "group": gib["llm_embedding"] + gib["llm_head"] + gib["vae"] + gib["other"] + 2 * block,
            # The largest single layer (the embedding) or the VAE, which still moves whole.
            "sequential": max(gib["llm_embedding"], gib["vae"]) + gib["other"],
        }
        moves = {"none": "–", "model": f"{weights * 2**30 / 1e9 / PCIE_GB_S:.1f} s per job",
                 "group": f"{dit_move_s:.2f} s per step, overlapped", "sequential": f"{dit_move_s:.2f} s per step, not overlapped"}
        for rung in RUNGS:
            if mode != "bf16" and rung in ("group", "sequential"):
                continue  # refused: diffusers' hooks do not move torchao/bitsandbytes tensors with streams yet
            total = resident[rung] + activation_gib + CUDA_CONTEXT_GIB
            rows.append({"mode": mode, "offload": rung, "weights_gib": round(weights, 2),
                         "on_gpu_gib": round(total, 1), "transfer": moves[rung],
                         "fits": [card for card in CARDS_GIB if total <= 0.9 * card]})
    return rows


def memory_table(doc: dict, activations: dict) -> str:
    """Markdown: every mode and rung, GPU memory without and with VAE tiling, which cards fit (without)."""
    plain = memory_rows(doc, activations["default"])
    tiled = memory_rows(doc, activations.get("vae_tiling", activations["default"]))
    lines = ["| quantization | offload | weights (GiB) | GPU memory at 1024² (GiB) | with `--vae-tiling` | "
             "weight transfer (PCIe 4.0 x16) | " + " | ".join(f"{c} GB" for c in CARDS_GIB) + " |",
             "|---|---|---:|---:|---:|---|" + "---|" * len(CARDS_GIB)]
    for row, tiled_row in zip(plain, tiled):
        fits = " | ".join("✔" if c in row["fits"] else ("✔ tiled" if c in tiled_row["fits"] else "✘")
                          for c in CARDS_GIB)
        lines.append(f"| {row['mode']} | {row['offload']} | {row['weights_gib']} | {row['on_gpu_gib']} | "
                     f"{tiled_row['on_gpu_gib']} | {row['transfer']} | {fits} |")
    return "\n".join(lines)


def activation_estimate(timing_doc: dict) -> dict:
    """GPU activation memory at 1024² from a CPU float32 run: RSS growth of one text-to-image run, halved."""
    out = {}
    for variant, jobs in timing_doc["results"].items():
        summary = jobs.get("t2i", {}).get("summary", {})
        if "run_extra_rss_gib" in summary:
            out[variant] = round(summary["run_extra_rss_gib"]["median"] / 2, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/quant.py", description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=None, help="comma-separated modes (default: int8,bf16 on CPU, all on CUDA)")
    p.add_argument("--layers", default="4")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--jobs", default="t2i,edit,understand,cot")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="keep one process per mode loaded across its runs (needs RAM for every mode at once)")
    p.add_argument("--skip-timing", action="store_true", help="drift and bytes only")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--show", type=Path, help="print the table of an earlier result and exit")
    p.add_argument("--side-by-side", type=Path, metavar="RUN_JSON",
                   help="print each mode against float32 with the spread over rounds, from a bench/run.py "
                        "--compare-settings default MODE ... result, and exit")
    p.add_argument("--memory-table", type=Path, metavar="RUN_JSON",
                   help="with --show: the released model's GPU memory table, activations from this bench/run.py "
                        "result of t2i at 1024² (settings default and vae_tiling)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        return child(args)
    if args.side_by_side:
        print(side_by_side(json.loads(args.side_by_side.read_text())))
        return 0
    if args.show:
        doc = json.loads(args.show.read_text())
        if doc.get("timing_file") and args.show.with_name(doc["timing_file"]).is_file():
            # summarised again, with this version's metrics
            doc["timing"] = timing_summary(json.loads(args.show.with_name(doc["timing_file"]).read_text()), doc["modes"])
        print(markdown(doc))
        if args.memory_table:
            activations = activation_estimate(json.loads(args.memory_table.read_text()))
            print(f"\nActivations at 1024² (GiB, bfloat16): {activations}\n")
            print(memory_table(doc, activations))
        return 0
    default_modes = CUDA_MODES if args.device.startswith("cuda") else CPU_MODES
    modes = [m.strip() for m in (args.modes or ",".join(default_modes)).split(",") if m.strip()]
    ckpt = ensure_checkpoint(args.layers, say=log)
    started = _dt.datetime.now().astimezone()
    out_path = args.json or RESULTS / f"quant-{args.device.split(':')[0]}-{started.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {"schema": 1, "created": started.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
           "modes": modes, "config": {k: getattr(args, k) for k in ("layers", "size", "steps", "repeats", "threads",
                                                                    "device", "dtype", "jobs", "isolate")},
           "loadavg_start": os.getloadavg()}
    doc["drift"] = measure_drift(args, ckpt, modes)
    doc["bench_layers"] = read_layers(ckpt)
    doc["released_params"] = released_params(doc["drift"]["float32"]["params"], doc["bench_layers"])
    if not args.skip_timing:
        timing_path = out_path.with_name(out_path.stem + "-timing.json")
        doc["timing_file"] = timing_path.name
        doc["timing"] = timing_summary(measure_timing(args, modes, timing_path), modes)
    doc["loadavg_end"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1))
    print(markdown(doc))
    log(f"\nresults: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
