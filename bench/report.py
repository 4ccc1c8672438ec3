"""Summaries, ratios and the Markdown table of a benchmark result (also used by ``run.py --show``)."""

from __future__ import annotations

import statistics

# The reference implementation's published measurements on this machine class (2-core CPU, 2 threads),
# on the "bench" checkpoint: released widths and heads, 4 layers each of ViT, LLM and DiT, the full
# Qwen-Image VAE, float32, 256x256, 4 steps, 32 new tokens. Peak RSS is the whole job process.
REFERENCE_CONFIG = {"layers": {"vit": 4, "llm": 4, "dit": 4}, "size": 256, "steps": 4, "threads": 2,
                    "device": "cpu", "dtype": "float32", "max_new_tokens": 32}
REFERENCE = {
    "t2i": {"total_s": 21.1, "vlm_s": 2.8, "dit_s": 13.0, "dit_step_s": 3.2, "vae_decode_s": 4.5,
            "peak_rss_gib": 5.0},
    "edit": {"total_s": 87.8, "vit_s": 2.1, "llm_s": 6.5, "vlm_s": 8.6, "dit_s": 50.4, "dit_step_s": 12.6,
             "vae_encode_s": 26.1, "vae_decode_s": 4.5, "peak_rss_gib": 7.3},
    "understand": {"total_s": 5.0, "ttft_s": 2.5, "decode_tok_s": 12.3},
    "cot": {"total_s": 25.0},
}
# (job, metric) -> (comparison, bound) on ours/reference.
TARGETS = {
    ("t2i", "total_s"): ("<=", 0.45),
    ("cot", "total_s"): ("<=", 0.45),
    ("edit", "total_s"): ("<=", 0.40),
    ("understand", "decode_tok_s"): (">=", 1.5),
    ("t2i", "peak_rss_gib"): ("<=", 1.0),
    ("edit", "peak_rss_gib"): ("<=", 1.0),
}

HIGHER_IS_BETTER = {"decode_tok_s", "cpu_util"}

# What the table shows per job, in order: (metric, label).
TABLE_ROWS = {
    "import": [("total_s", "import torch + internvl_u_core (s)"), ("torch_s", "  of which torch (s)"),
               ("core_s", "  of which internvl_u_core (s)")],
    "t2i": [("total_s", "total (s)"), ("vlm_s", "VLM conditioning (s)"), ("dit_step_s", "DiT per step (s)"),
            ("dit_s", "DiT all steps (s)"), ("vae_decode_s", "VAE decode (s)"), ("other_s", "other (s)")],
    "edit": [("total_s", "total (s)"), ("vit_s", "ViT (s)"), ("llm_s", "LLM (s)"),
             ("vae_encode_s", "VAE encode (s)"), ("dit_step_s", "DiT per step (s)"), ("dit_s", "DiT all steps (s)"),
             ("vae_decode_s", "VAE decode (s)"), ("other_s", "other (s)")],
    "understand": [("total_s", "total (s)"), ("ttft_s", "time to first token (s)"),
                   ("decode_tok_s", "decode (tokens/s)"), ("vit_s", "ViT (s)")],
    "cot": [("total_s", "total (s)"), ("reason_s", "chain-of-thought (s)"), ("decode_tok_s", "decode (tokens/s)"),
            ("image_s", "image stage (s)"), ("dit_step_s", "DiT per step (s)"), ("vae_decode_s", "VAE decode (s)")],
}
RUN_MEMORY_ROWS = [("cpu_util", "CPU time / (wall x threads)"), ("run_extra_rss_gib", "RSS growth during a run (GiB)"),
                   ("gpu_run_extra_gib", "GPU memory growth during a run (GiB)")]
PROCESS_ROWS = [("load_s", "load (s)"), ("first_run_s", "first run after load (s)"), ("rss_after_load_gib", "RSS after load (GiB)"),
                ("peak_rss_gib", "peak RSS (GiB)"), ("gpu_peak_gib", "peak GPU memory (GiB)")]
# Numbers measured once per child process (the rest once per timed run).
PROCESS_METRICS = ("load_s", "first_run_s", "core_import_s", "rss_after_load_gib", "peak_rss_load_gib", "peak_rss_gib",
                   "rss_end_gib", "rss_anon_after_load_gib", "rss_file_after_load_gib", "rss_anon_end_gib",
                   "rss_file_end_gib", "model_gib", "gpu_alloc_after_load_gib", "gpu_peak_load_gib", "gpu_peak_gib",
                   "gpu_peak_reserved_gib")


def stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def summarise(job_result: dict) -> dict:
    """Per metric: min/median/max over the timed runs (run metrics) or the child processes (memory, load)."""
    summary: dict = {}
    runs = job_result.get("runs", [])
    keys = sorted({k for run in runs for k, v in run.items() if isinstance(v, (int, float))})
    for key in keys:
        s = stats([run.get(key) for run in runs])
        if s:
            summary[key] = s
    for key in PROCESS_METRICS:
        s = stats([proc.get(key) for proc in job_result.get("processes", [])])
        if s:
            summary[key] = s
    return summary


def best(metric: str, s: dict) -> float:
    return s["max"] if metric in HIGHER_IS_BETTER else s["min"]


def reference_applies(config: dict) -> bool:
    return all(config.get(k) == v for k, v in REFERENCE_CONFIG.items())


def ratios(results: dict, variants: list[str]) -> dict:
    """Median of each later variant divided by the first's, per job and metric."""
    out: dict = {}
    if len(variants) < 2:
        return out
    base = results.get(variants[0], {})
    for other in variants[1:]:
        table: dict = {}
        for job, data in results.get(other, {}).items():
            a_sum = base.get(job, {}).get("summary", {})
            for metric, s in data.get("summary", {}).items():
                a = a_sum.get(metric)
                if a and a["median"]:
                    table.setdefault(job, {})[metric] = round(s["median"] / a["median"], 4)
        out[f"{other}/{variants[0]}"] = table
    return out


def paired_ratio(a_runs: list[dict], b_runs: list[dict], metric: str = "total_s") -> float | None:
    """Median over rounds of run_i(B) / run_i(A) of ``metric`` (interleaved runs pair up); None without a pair."""
    pairs = [b[metric] / a[metric] for a, b in zip(a_runs, b_runs) if a.get(metric) and b.get(metric)]
    return statistics.median(pairs) if pairs else None


def paired_ratios(results: dict, variants: list[str]) -> dict:
    """:func:`paired_ratio` of each job's total time, every variant against the first."""
    out: dict = {}
    if len(variants) < 2:
        return out
    for other in variants[1:]:
        table = {}
        for job, data in results.get(other, {}).items():
            ratio = paired_ratio(results.get(variants[0], {}).get(job, {}).get("runs", []), data.get("runs", []))
            if ratio is not None:
                table[job] = round(ratio, 4)
        out[f"{other}/{variants[0]}"] = table
    return out


def vs_reference(results: dict, variants: list[str]) -> dict:
    out: dict = {}
    for name in variants:
        table: dict = {}
        for job, ref in REFERENCE.items():
            summary = results.get(name, {}).get(job, {}).get("summary", {})
            for metric, ref_value in ref.items():
                if metric in summary:
                    ratio = summary[metric]["median"] / ref_value
                    entry = {"ours_median": summary[metric]["median"], "reference": ref_value,
                             "ratio": round(ratio, 4)}
                    if (job, metric) in TARGETS:
                        op, bound = TARGETS[(job, metric)]
                        entry["target"] = f"{op} {bound}x"
                        entry["met"] = ratio <= bound if op == "<=" else ratio >= bound
                    table.setdefault(job, {})[metric] = entry
        out[name] = table
    return out


def _fmt(value: float | None, metric: str = "") -> str:
    if value is None:
        return ""
    if metric.endswith("_gib"):
        return f"{value:.2f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _target_text(job: str, metric: str, ratio: float | None) -> str:
    if (job, metric) not in TARGETS or ratio is None:
        return ""
    op, bound = TARGETS[(job, metric)]
    met = ratio <= bound if op == "<=" else ratio >= bound
    return f"{op} {bound}x: {'yes' if met else 'NO'}"


def _rows_for(job: str, summaries: list[dict]):
    rows = [m for m in TABLE_ROWS.get(job, [])]
    if job != "import":
        rows += RUN_MEMORY_ROWS + PROCESS_ROWS
    for metric, label in rows:
        if any(metric in s for s in summaries):
            yield metric, label


def markdown(doc: dict) -> str:
    """The short table printed after a run (and by ``run.py --show``)."""
    config, machine = doc["config"], doc["machine"]
    variants = [v["name"] for v in doc["variants"]]
    results = doc["results"]
    show_ref = reference_applies(config)
    layers = config["layers"]
    lines = [
        f"InternVL-U benchmark: {config['device']} {config['dtype']}, {config['threads']} threads, "
        f"layers ViT/LLM/DiT {layers['vit']}/{layers['llm']}/{layers['dit']}, {config['size']}x{config['size']}, "
        f"{config['steps']} steps, {config['max_new_tokens']} new tokens, warm-up {config['warmup']} + "
        f"{config['repeats']} timed runs",
        f"machine: {machine.get('cpu_model')} ({machine.get('cpu_count')} CPUs, {machine.get('mem_total_gib')} GiB), "
        f"{machine.get('platform')}, torch {machine.get('torch_version')}"
        + (f", GPU {machine['gpu_name']}" if machine.get("gpu_name") else "")
        + f"; load average {machine.get('loadavg_start')} -> {machine.get('loadavg_end')}",
    ]
    for v in doc["variants"]:
        if len(variants) > 1 or v.get("commit"):
            desc = v.get("description", "")
            lines.append(f"{v['name']}: {desc}")
    lines.append("")
    if len(variants) == 1:
        name = variants[0]
        header = "| job | metric | median | best |"
        sep = "|---|---|---:|---:|"
        if show_ref:
            header += " reference | median/reference | target |"
            sep += "---:|---:|---|"
        lines += [header, sep]
        for job in config["jobs"]:
            data = results.get(name, {}).get(job, {})
            if data.get("errors"):
                lines.append(f"| {job} | error: {data['errors'][0]['error'][:80]} | | |")
            summary = data.get("summary", {})
            for metric, label in _rows_for(job, [summary]):
                s = summary.get(metric)
                row = f"| {job} | {label} | {_fmt(s['median'], metric) if s else ''} | " \
                      f"{_fmt(best(metric, s), metric) if s else ''} |"
                if show_ref:
                    ref = REFERENCE.get(job, {}).get(metric)
                    ratio = s["median"] / ref if (s and ref) else None
                    row += f" {_fmt(ref, metric)} | {f'{ratio:.2f}x' if ratio is not None else ''} | " \
                           f"{_target_text(job, metric, ratio)} |"
                lines.append(row)
    else:
        base = variants[0]
        header = "| job | metric | " + " | ".join(variants) + " | " + " | ".join(f"{v}/{base}" for v in variants[1:]) + " |"
        sep = "|---|---|" + "---:|" * (2 * len(variants) - 1)
        if show_ref:
            header += " reference | " + " | ".join(f"{v}/ref" for v in variants) + " |"
            sep += "---:|" * (len(variants) + 1)
        lines += [header, sep]
        for job in config["jobs"]:
            summaries = [results.get(v, {}).get(job, {}).get("summary", {}) for v in variants]
            for v in variants:
                errors = results.get(v, {}).get(job, {}).get("errors")
                if errors:
                    lines.append(f"| {job} | {v} error: {errors[0]['error'][:80]} |")
            for metric, label in _rows_for(job, summaries):
                meds = [s.get(metric, {}).get("median") if s.get(metric) else None for s in summaries]
                cells = [_fmt(m, metric) for m in meds]
                ratio_cells = [f"{m / meds[0]:.3f}" if (m is not None and meds[0]) else "" for m in meds[1:]]
                row = f"| {job} | {label} | " + " | ".join(cells) + " | " + " | ".join(ratio_cells) + " |"
                if show_ref:
                    ref = REFERENCE.get(job, {}).get(metric)
                    ref_cells = [f"{m / ref:.2f}x" if (m is not None and ref) else "" for m in meds]
                    row += f" {_fmt(ref, metric)} | " + " | ".join(ref_cells) + " |"
                lines.append(row)
        paired = doc.get("paired_ratios", {})
        if any(paired.values()):
            lines.append("")
            for key, table in paired.items():
                text = ", ".join(f"{job} {ratio:.3f}" for job, ratio in table.items())
                lines.append(f"paired total-time ratio {key} (median over interleaved rounds): {text}")
    lines.append("")
    lines.append("median and best over the timed runs (best = min time / max tokens/s); memory and load: per "
                 "job process.")
    if show_ref:
        lines.append("reference = the reference implementation's published measurements on this machine class "
                     "(2-core CPU, 2 threads, same checkpoint and sizes); not measured by this run.")
    else:
        lines.append("reference columns left out: the settings differ from the reference's "
                     "(4 layers, 256x256, 4 steps, 2 threads, CPU float32, 32 tokens).")
    return "\n".join(lines)
