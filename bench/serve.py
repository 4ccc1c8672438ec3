"""Serving benchmark: ``python bench/serve.py`` (see bench/README.md, "Serving").

* ``throughput``: 8 concurrent text-to-image requests (bench checkpoint, 256², 4 steps) against
  ``internvl-u serve --max-batch 8`` and ``--max-batch 1``; images per minute. Both servers stay
  loaded and the rounds alternate (on, off, on, off, …), so a noisy neighbour hits both alike.
* ``overhead``: one request at a time over HTTP (``--max-batch 1`` server) against the same call
  in this process (``pipe.generate``), alternating; the difference of the medians over the
  in-process median.
* ``soak``: 200 requests from 16 clients (a mix of generate, edit, chat, streamed chat) on the tiny
  checkpoint; every answer checked, the server's RSS sampled.

Writes ``bench/results/serve-<timestamp>.json`` (or ``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO / "tests")]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from checkpoint import ensure_checkpoint  # noqa: E402
from PIL import Image  # noqa: E402
from serving import ServerProcess, data_uri, fox, png_bytes  # noqa: E402

PROMPTS = [
    "a red fox sleeping in fresh snow", "a lighthouse on a cliff at sunset", "two cats on a windowsill",
    "a bowl of ramen, top view", "an old map of an island", "a robot watering plants", "a hot air balloon over hills",
    "a glass of orange juice on a table",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def generate_request(url: str, prompt: str, seed: int, size: int, steps: int) -> tuple[float, float]:
    """(round-trip seconds, seconds the server spent in the pipeline) for one generation, image decoded."""
    started = time.perf_counter()
    answer = httpx.post(f"{url}/v1/images/generations", timeout=3600, json={
        "prompt": prompt, "size": f"{size}x{size}", "seed": seed, "num_inference_steps": steps})
    answer.raise_for_status()
    Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))).load()
    wall = time.perf_counter() - started
    pipeline = float(answer.headers["server-timing"].split("dur=")[1]) / 1000
    return wall, pipeline


def concurrent_round(server: ServerProcess, clients: int, size: int, steps: int, round_index: int) -> dict:
    before = server.health()["passes"]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(generate_request, server.url, PROMPTS[i % len(PROMPTS)], 1000 * round_index + i,
                               size, steps) for i in range(clients)]
        latencies = [f.result()[0] for f in futures]
    wall = time.perf_counter() - started
    return {"wall_s": wall, "images_per_min": clients / wall * 60, "latency_s": latencies,
            "passes": server.health()["passes"] - before}


def throughput(args, checkpoint: Path, logs: Path) -> dict:
    servers = {
        name: ServerProcess(logs / f"{name}.log", "--max-batch", str(batch), "--max-queue", "64",
                            model=checkpoint, model_name="bench", threads=args.threads)
        for name, batch in (("batching_on", args.clients), ("batching_off", 1))
    }
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for name, server in servers.items():
            log(f"starting the {name} server")
            server.start(timeout=1800)
            log(f"  warm-up round ({name})")
            concurrent_round(server, args.clients, args.size, args.steps, round_index=0)
        for index in range(1, args.rounds + 1):
            order = list(servers) if index % 2 else list(reversed(servers))
            for name in order:
                result = concurrent_round(servers[name], args.clients, args.size, args.steps, index)
                runs[name].append(result)
                log(f"  round {index} {name}: {result['images_per_min']:.2f} images/min "
                    f"({result['wall_s']:.1f} s, {result['passes']} passes)")
    finally:
        for server in servers.values():
            server.stop()
    summary = {name: {"images_per_min_median": statistics.median(r["images_per_min"] for r in rs),
                      "images_per_min": [r["images_per_min"] for r in rs],
                      "passes": [r["passes"] for r in rs]} for name, rs in runs.items()}
    summary["speedup"] = (summary["batching_on"]["images_per_min_median"]
                          / summary["batching_off"]["images_per_min_median"])
    return {"runs": runs, "summary": summary}


def overhead(args, checkpoint: Path, logs: Path) -> dict:
    """HTTP cost of one request, two ways: the round trip minus the server's own pipeline time
    (``Server-Timing``; both halves share any machine load), and against the same call in this
    process (alternating pairs; sensitive to load)."""
    import torch

    from internvl_u_core import InternVLUPipeline

    torch.set_num_threads(args.threads)
    server = ServerProcess(logs / "overhead.log", "--max-batch", "1", model=checkpoint, model_name="bench",
                           threads=args.threads)
    log("starting the server for the overhead runs")
    server.start(timeout=1800)
    try:
        log("loading the pipeline in this process")
        pipe = InternVLUPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32, device="cpu")
        pairs = []
        for index in range(args.overhead_runs + 1):  # the first pair warms both up
            prompt, seed = PROMPTS[index % len(PROMPTS)], index
            wall, pipeline = generate_request(server.url, prompt, seed, args.size, args.steps)
            started = time.perf_counter()
            image = pipe.generate(prompt, width=args.size, height=args.size, steps=args.steps, seed=seed)[0]
            png_bytes(image)  # an in-process caller keeps the result as a file too
            local = time.perf_counter() - started
            if index:
                pairs.append({"http_s": wall, "server_pipeline_s": pipeline, "in_process_s": local})
                log(f"  pair {index}: HTTP {wall:.2f} s (pipeline {pipeline:.2f} s), in-process {local:.2f} s")
    finally:
        server.stop()
    serving = [100 * (p["http_s"] - p["server_pipeline_s"]) / p["server_pipeline_s"] for p in pairs]
    paired = [100 * (p["http_s"] - p["in_process_s"]) / p["in_process_s"] for p in pairs]
    return {"pairs": pairs, "serving_overhead_pct": serving, "serving_overhead_pct_median": statistics.median(serving),
            "serving_overhead_s_median": statistics.median(p["http_s"] - p["server_pipeline_s"] for p in pairs),
            "paired_overhead_pct": paired, "paired_overhead_pct_median": statistics.median(paired),
            "http_median_s": statistics.median(p["http_s"] for p in pairs),
            "in_process_median_s": statistics.median(p["in_process_s"] for p in pairs)}


def soak(args, logs: Path) -> dict:
    """Many clients, mixed requests, on the tiny checkpoint: nothing lost, every answer equal to the
    in-process pipeline's, the server's RSS sampled."""
    import torch

    from internvl_u_core import InternVLUPipeline

    server = ServerProcess(logs / "soak.log", "--max-batch", "4", "--max-queue", "256", threads=args.threads)
    server.start()
    source = fox()
    upload = png_bytes(source)
    requests = {  # kind → (path, request arguments of variant v)
        "generate": ("/v1/images/generations", lambda v: {"json": {
            "prompt": f"soak {v}", "size": "32x32", "seed": v, "num_inference_steps": 2}}),
        "edit": ("/v1/images/edits", lambda v: {
            "data": {"prompt": f"edit {v}", "seed": str(v), "num_inference_steps": "2", "size": "32x32"},
            "files": [("image", ("fox.png", upload, "image/png"))]}),
        "chat": ("/v1/chat/completions", lambda v: {"json": {"max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(source)}}, {"type": "text", "text": f"q {v}"}]}]}}),
        "stream": ("/v1/chat/completions", lambda v: {"json": {
            "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": f"s {v}"}]}}),
    }
    kinds = list(requests)
    answers: list[tuple[str, int, object]] = []
    samples: list[tuple[int, float]] = []
    failures: list[tuple] = []

    def one(i: int) -> None:
        kind, variant = kinds[i % len(kinds)], (i // len(kinds)) % 5
        path, build = requests[kind]
        answer = httpx.post(f"{server.url}{path}", timeout=600, **build(variant))
        if answer.status_code != 200:
            failures.append((i, kind, answer.status_code, answer.text[:200]))
            return
        answers.append((kind, variant, _answer(kind, answer)))
        if i % 10 == 0:
            samples.append((i, rss_mib(server.pid)))

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(args.soak_clients) as pool:
            list(pool.map(one, range(args.soak_requests)))
        wall = time.perf_counter() - started
        health = server.health()
    finally:
        server.stop()
    pipe = InternVLUPipeline.from_pretrained(server.model, torch_dtype=torch.float32, device="cpu")
    expected = {
        "generate": lambda v: np.asarray(pipe.generate(f"soak {v}", width=32, height=32, steps=2, seed=v)[0]),
        "edit": lambda v: np.asarray(pipe.edit(source, f"edit {v}", width=32, height=32, steps=2, seed=v)[0]),
        "chat": lambda v: pipe.understand(source, f"q {v}", max_new_tokens=6),
        "stream": lambda v: pipe.understand(None, f"s {v}", max_new_tokens=6),
    }
    reference = {(kind, v): expected[kind](v) for kind in kinds for v in range(5)}
    wrong = [(kind, v) for kind, v, got in answers if not _same(got, reference[kind, v])]
    samples.sort()
    after_warmup = [rss for i, rss in samples if i >= args.soak_requests // 4]
    return {
        "requests": args.soak_requests, "clients": args.soak_clients, "wall_s": wall, "failures": failures,
        "answered": len(answers), "wrong": wrong, "rss_mib": samples,
        "rss_growth_after_warmup_mib": max(after_warmup) - min(after_warmup), "server_passes": health["passes"],
    }


def _answer(kind: str, response: httpx.Response):
    if kind in ("generate", "edit"):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))
    if kind == "chat":
        return response.json()["choices"][0]["message"]["content"]
    chunks = [json.loads(line[5:]) for line in response.text.splitlines()
              if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def _same(got, want) -> bool:
    return np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want


def table(document: dict) -> str:
    lines = ["| measurement | value |", "|---|---|"]
    results = document["results"]
    if "throughput" in results:
        summary = results["throughput"]["summary"]
        for name in ("batching_on", "batching_off"):
            values = ", ".join(f"{v:.2f}" for v in summary[name]["images_per_min"])
            lines.append(f"| {name.replace('_', ' ')}: images/min (median; rounds) | "
                         f"{summary[name]['images_per_min_median']:.2f} ({values}) |")
        lines.append(f"| batching speed-up | {summary['speedup']:.2f}x |")
    if "overhead" in results:
        o = results["overhead"]
        lines.append(f"| HTTP overhead: round trip minus the server's pipeline time (median) | "
                     f"{o['serving_overhead_s_median'] * 1000:.0f} ms = {o['serving_overhead_pct_median']:.2f}% |")
        lines.append(f"| one request: HTTP / in-process, alternating (median s) | {o['http_median_s']:.2f} / "
                     f"{o['in_process_median_s']:.2f} ({o['paired_overhead_pct_median']:+.1f}%) |")
    if "soak" in results:
        s = results["soak"]
        lines.append(f"| soak: answered / sent ({s['clients']} clients) | {s['answered']} / {s['requests']} |")
        lines.append(f"| soak: answers different from in-process | {len(s['wrong'])} |")
        lines.append(f"| soak: server RSS growth after warm-up | {s['rss_growth_after_warmup_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="throughput,overhead,soak")
    parser.add_argument("--layers", default="4", help="bench checkpoint layers (see bench/checkpoint.py)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8, help="concurrent requests per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per server (after a warm-up)")
    parser.add_argument("--overhead-runs", type=int, default=5, help="timed HTTP/in-process pairs")
    parser.add_argument("--soak-requests", type=int, default=200)
    parser.add_argument("--soak-clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="result file (default: bench/results/serve-<timestamp>.json)")
    args = parser.parse_args(argv)
    jobs = args.jobs.split(",")
    started = _dt.datetime.now(_dt.timezone.utc)
    document = {
        "created": started.isoformat(timespec="seconds"), "command": sys.argv,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "config": {k: v for k, v in vars(args).items() if k != "json"}, "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as folder:
        logs = Path(folder)
        if {"throughput", "overhead"} & set(jobs):
            checkpoint = ensure_checkpoint(args.layers, say=log)
        if "throughput" in jobs:
            document["results"]["throughput"] = throughput(args, checkpoint, logs)
        if "overhead" in jobs:
            document["results"]["overhead"] = overhead(args, checkpoint, logs)
        if "soak" in jobs:
            document["results"]["soak"] = soak(args, logs)
    path = write_results(document, args.json, "serve", started)
    print(table(document))
    log(f"wrote {path}")
    return 0


def write_results(document: dict, json_arg: str | None, prefix: str, started: _dt.datetime) -> Path:
    """Stamp the closing load average and write the result (default: bench/results/<prefix>-<time>.json)."""
    document["machine"]["loadavg_end"] = os.getloadavg()
    path = Path(json_arg) if json_arg else BENCH / "results" / f"{prefix}-{started:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
