"""Ray Serve benchmark: ``python bench/ray_serve.py`` (see bench/README.md, "Ray Serve").

* ``overhead``: one request at a time, alternating between ``internvl-u serve`` (a process) and the
  Ray application with one replica (the same options and thread count), bench checkpoint, 256²,
  4 steps. Reported: the median round trips, and what each adds to its own pipeline time
  (round trip minus ``Server-Timing``), whose difference is the cost of Ray's proxy and its
  hop to the replica; the second figure holds up on a loaded machine, the first does not.
* ``throughput``: rounds of 8 concurrent requests against the Ray application with 1 replica
  (2 threads) and then with 2 replicas (1 thread each: the same two cores); images per minute.

All on one local cluster (127.0.0.1, 2 CPUs, no dashboard, workers at niceness 0). Writes
``bench/results/ray-serve-<timestamp>.json`` (or ``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
sys.path[:0] = [str(BENCH), str(REPO / "tests"), str(REPO)]

from checkpoint import ensure_checkpoint  # noqa: E402
from serve import PROMPTS, generate_request, log, write_results  # noqa: E402
from serving import ServerProcess, free_port  # noqa: E402

APP = "internvl-u-bench"


def deploy(checkpoint: Path, replicas: int, threads: int, max_batch: int) -> None:
    """The Ray application with ``replicas`` replicas of ``threads`` threads each (redeployed in place)."""
    from ray import serve

    from internvl_u_serve import ray as on_ray

    options = on_ray.serve_options({
        "model": str(checkpoint), "served_model_name": "bench", "dtype": "float32", "device": "cpu",
        "max_batch": max_batch, "max_queue": 64, "replicas": replicas, "cpus_per_replica": 2 / replicas,
        "log_level": "warning",
    })
    placed = on_ray.deployment_options(options)
    count = str(threads)
    placed["ray_actor_options"]["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}}
    application = on_ray.InternVLUReplica.options(**placed).bind(on_ray.replica_options(options))
    serve.run(application, name=APP, route_prefix="/")


def concurrent_round(url: str, clients: int, size: int, steps: int, round_index: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(generate_request, url, PROMPTS[i % len(PROMPTS)], 1000 * round_index + i, size, steps)
                   for i in range(clients)]
        latencies = [f.result()[0] for f in futures]
    wall = time.perf_counter() - started
    return {"wall_s": wall, "images_per_min": clients / wall * 60, "latency_s": latencies}


def overhead(args, checkpoint: Path, ray_url: str, logs: Path) -> dict:
    direct = ServerProcess(logs / "direct.log", "--max-batch", str(args.max_batch), model=checkpoint,
                           model_name="bench", threads=args.threads)
    log("starting internvl-u serve (direct)")
    direct.start(timeout=1800)
    pairs = []
    try:
        for index in range(args.overhead_runs + 1):  # the first pair warms both up
            prompt, seed = PROMPTS[index % len(PROMPTS)], index
            order = [("direct", direct.url), ("ray", ray_url)]
            if index % 2:
                order.reverse()
            pair = {}
            for name, url in order:
                wall, pipeline = generate_request(url, prompt, seed, args.size, args.steps)
                pair[name] = {"round_trip_s": wall, "pipeline_s": pipeline}
            if index:
                pairs.append(pair)
                log(f"  pair {index}: direct {pair['direct']['round_trip_s']:.2f} s, ray {pair['ray']['round_trip_s']:.2f} s")
    finally:
        direct.stop()

    def median(name: str, key) -> float:
        return statistics.median(key(p[name]) for p in pairs)

    serving = {name: median(name, lambda r: r["round_trip_s"] - r["pipeline_s"]) for name in ("direct", "ray")}
    pipeline = median("direct", lambda r: r["pipeline_s"])
    return {
        "pairs": pairs,
        "round_trip_median_s": {name: median(name, lambda r: r["round_trip_s"]) for name in ("direct", "ray")},
        "serving_median_s": serving,
        "ray_added_s": serving["ray"] - serving["direct"],
        "ray_added_pct_of_pipeline": 100 * (serving["ray"] - serving["direct"]) / pipeline,
        "round_trip_ratio_median": statistics.median(p["ray"]["round_trip_s"] / p["direct"]["round_trip_s"] for p in pairs),
    }


def throughput(args, url: str, replicas: int) -> dict:
    log(f"  warm-up round ({replicas} replica{'s' if replicas > 1 else ''})")
    concurrent_round(url, args.clients, args.size, args.steps, round_index=0)
    runs = []
    for index in range(1, args.rounds + 1):
        result = concurrent_round(url, args.clients, args.size, args.steps, index)
        runs.append(result)
        log(f"  round {index}, {replicas} replica(s): {result['images_per_min']:.2f} images/min ({result['wall_s']:.1f} s)")
    return {"runs": runs, "images_per_min": [r["images_per_min"] for r in runs],
            "images_per_min_median": statistics.median(r["images_per_min"] for r in runs)}


def table(document: dict) -> str:
    results = document["results"]
    lines = ["| measure | value |", "|---|---|"]
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            f"| round trip, median: `internvl-u serve` / Ray, 1 replica | {o['round_trip_median_s']['direct']:.2f} s / "
            f"{o['round_trip_median_s']['ray']:.2f} s (Ray/direct {o['round_trip_ratio_median']:.3f}) |",
            f"| serving time beyond the pipeline: direct / Ray | {1000 * o['serving_median_s']['direct']:.0f} ms / "
            f"{1000 * o['serving_median_s']['ray']:.0f} ms |",
            f"| added by Ray's proxy | {1000 * o['ray_added_s']:.0f} ms = {o['ray_added_pct_of_pipeline']:.1f}% of the pipeline time |",
        ]
    for replicas in ("1", "2"):
        if replicas in results.get("throughput", {}):
            t = results["throughput"][replicas]
            lines.append(f"| images/min, {replicas} replica(s), {document['config']['clients']} clients | "
                         f"{t['images_per_min_median']:.2f} (rounds: {', '.join(f'{v:.2f}' for v in t['images_per_min'])}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="overhead,throughput")
    parser.add_argument("--layers", default="4", help="bench checkpoint layers (see bench/checkpoint.py)")
    parser.add_argument("--checkpoint", default=None, help="another checkpoint folder (e.g. the tiny one, for a smoke run)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=1, help="each server's --max-batch (default: 1)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent requests per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="timed throughput rounds per replica count")
    parser.add_argument("--overhead-runs", type=int, default=8, help="timed direct/Ray pairs")
    parser.add_argument("--threads", type=int, default=2, help="threads of the direct server and of a lone replica")
    parser.add_argument("--json", default=None, help="result file (default: bench/results/ray-serve-<timestamp>.json)")
    args = parser.parse_args(argv)
    jobs = args.jobs.split(",")
    started = _dt.datetime.now(_dt.timezone.utc)
    document = {
        "created": started.isoformat(timespec="seconds"), "command": sys.argv,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "config": {k: v for k, v in vars(args).items() if k != "json"}, "results": {},
    }
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(args.layers, say=log)

    import ray
    from ray import serve

    from internvl_u_serve import ray as on_ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault(on_ray.PROXY_CALLBACK_ENV, on_ray.PROXY_CALLBACK)
    # Ray starts its workers at niceness 15; on a machine shared with other work that would slow the
    # replicas against the direct server (niceness 0) for reasons unrelated to serving.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        log("deploying 1 replica")
        deploy(checkpoint, 1, args.threads, args.max_batch)
        with tempfile.TemporaryDirectory(prefix="ray-bench-") as folder:
            if "overhead" in jobs:
                document["results"]["overhead"] = overhead(args, checkpoint, url, Path(folder))
        if "throughput" in jobs:
            document["results"]["throughput"] = {"1": throughput(args, url, 1)}
            log("deploying 2 replicas")
            serve.delete(APP)  # the lone replica holds both CPUs: it goes before the two start
            deploy(checkpoint, 2, max(1, args.threads // 2), args.max_batch)
            document["results"]["throughput"]["2"] = throughput(args, url, 2)
    finally:
        serve.shutdown()
        ray.shutdown()
    path = write_results(document, args.json, "ray-serve", started)
    print(table(document))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
