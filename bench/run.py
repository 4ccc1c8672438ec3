"""InternVL-U benchmark: ``python bench/run.py`` (see bench/README.md).

Builds (once) a random-weight checkpoint with the released widths and a chosen number of layers,
then times import, load, text-to-image, edit, understanding and reasoning-guided generation, each
job in its own child process (so its peak memory is its own), with a warm-up and several timed
runs. Two or more settings (``--compare-settings``) or commits (``--compare-commits``) run side by
side, their timed runs interleaved. Writes a JSON file and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from checkpoint import CACHE, REPO, ensure_checkpoint, layer_counts  # noqa: E402
from worker import JOBS, SETTINGS, setting_needs_cuda, setting_parts  # noqa: E402

WORKER = BENCH / "worker.py"
RESULTS = BENCH / "results"
DEFAULT_JOBS = "import,t2i,edit,understand,cot"
DTYPES = ("float32", "bfloat16", "float16")
WORKTREE_ALIASES = (".", "WORKTREE")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Variant:
    name: str  # column name in the table
    setting: str  # settings preset(s) applied after loading, e.g. "default" or "offload+vae_tiling"
    code: str  # folder put first on PYTHONPATH: where internvl_u_core is imported from
    commit: str | None = None
    rev: str | None = None
    description: str = ""


class BenchError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark the InternVL-U pipeline on a random-weight checkpoint with the released widths.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--layers", default="4", help="layers in each of ViT, LLM and DiT; 'all' = released 24/28/20")
    p.add_argument("--vocab", type=int, default=None,
                   help="LLM vocabulary size of the random checkpoint (default: the released 151936; the LM head "
                        "then dominates decoding: 1.2 GB read per token in float32)")
    p.add_argument("--size", type=int, default=256, help="output width = height in pixels (edit input too)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the image jobs")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per job (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per job process before the timed ones")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every job process")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and compute dtype")
    p.add_argument("--jobs", default=DEFAULT_JOBS, help=f"comma-separated subset of {','.join(JOBS)}")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens decoded by understand and by cot's chain-of-thought (forced: min = max)")
    p.add_argument("--setting", default="default",
                   help=f"settings preset for a single run; one of {', '.join(SETTINGS)} or a '+' combination")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--compare-settings", nargs="+", metavar="SETTING",
                       help="run these presets side by side (interleaved); ratios against the first")
    group.add_argument("--compare-commits", nargs="+", metavar="REV",
                       help="run these git revisions side by side (interleaved) from worktrees under "
                            "bench/.cache/worktrees; '.' = the current working tree; ratios against the first")
    p.add_argument("--isolate", action="store_true",
                   help="a fresh process (load + warm-up) for every timed run, so only one model is in memory "
                        "at a time; default: one process per job and variant kept alive across its runs")
    p.add_argument("--profile", choices=("cprofile", "torch"),
                   help="after the timed runs, one extra profiled run per job and variant "
                        "(files under bench/.cache/profiles/)")
    p.add_argument("--json", type=Path, help="result file (default: bench/results/<timestamp>.json)")
    p.add_argument("--show", type=Path, metavar="RESULT_JSON", help="print the table of an earlier result and exit")
    args = p.parse_args(argv)
    return args


def validate(args) -> None:
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown or not jobs:
        raise BenchError(f"--jobs: unknown job(s) {unknown or args.jobs!r}; choose from {', '.join(JOBS)}")
    args.jobs = [j for j in JOBS if j in jobs]  # canonical order
    try:
        args.layer_counts = layer_counts(args.layers)
    except ValueError as exc:
        raise BenchError(f"--layers must be a positive number or 'all', got {args.layers!r}") from exc
    for name, value, low in (("--size", args.size, 16), ("--steps", args.steps, 1), ("--repeats", args.repeats, 1),
                             ("--warmup", args.warmup, 0), ("--threads", args.threads, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise BenchError(f"{name} must be >= {low}, got {value}")
    settings = args.compare_settings or [args.setting]
    if args.compare_settings and len(args.compare_settings) < 2:
        raise BenchError("--compare-settings needs at least two settings")
    if args.compare_commits and len(args.compare_commits) < 2:
        raise BenchError("--compare-commits needs at least two revisions")
    if args.compare_settings and len(set(args.compare_settings)) != len(args.compare_settings):
        raise BenchError("--compare-settings: each setting once")
    for setting in settings:
        try:
            setting_parts(setting)
        except ValueError as exc:
            raise BenchError(str(exc)) from exc
        if setting_needs_cuda(setting) and not args.device.startswith("cuda"):
            raise BenchError(f"setting {setting!r} moves components to a GPU; it needs --device cuda")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise BenchError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise BenchError(f"--device {args.device} was asked for but CUDA is not available here "
                             f"(torch {torch.__version__}, {build}); run on a machine with a GPU or use --device cpu")


# ----------------------------------------------------------------------------------------------
# Machine and code identification
# ----------------------------------------------------------------------------------------------
def _git(*cmd: str, cwd: Path = REPO, check: bool = True) -> str:
    out = subprocess.run(["git", *cmd], cwd=cwd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise BenchError(f"git {' '.join(cmd)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(args) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD level torch's kernels use: AVX2, AVX512 ...
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": _mem_total_gib(),
        "threads": args.threads,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": args.device,
        "dtype": args.dtype,
        "loadavg_start": _loadavg(),
        "hostname": platform.node(),
    }
    if args.device.startswith("cuda"):
        info["gpu_name"] = torch.cuda.get_device_name(torch.device(args.device))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(torch.device(args.device)).total_memory
                                       / 2**30, 1)
    for package in ("transformers", "diffusers", "accelerate"):
        try:
            from importlib.metadata import version

            info[f"{package}_version"] = version(package)
        except Exception:
            info[f"{package}_version"] = None
    try:
        info["git_head"] = _git("rev-parse", "HEAD")
        info["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (BenchError, OSError):
        info["git_head"] = None
    return info


# ----------------------------------------------------------------------------------------------
# Variants: settings of one checkout, or commits from git worktrees
# ----------------------------------------------------------------------------------------------
def worktree_for(rev: str) -> tuple[Path, str, str]:
    sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if not sha:
        raise BenchError(f"--compare-commits: {rev!r} is not a commit of {REPO}")
    path = CACHE / "worktrees" / sha
    subject = _git("log", "-1", "--format=%s", sha)[:70]
    if path.is_dir() and _git("rev-parse", "HEAD", cwd=path, check=False) == sha:
        return path, sha, subject
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _git("worktree", "prune")
    log(f"creating worktree {path} for {rev} ({sha[:10]})")
    _git("worktree", "add", "--detach", str(path), sha)
    return path, sha, subject


def make_variants(args) -> list[Variant]:
    if args.compare_commits:
        variants = []
        for rev in args.compare_commits:
            if rev in WORKTREE_ALIASES:
                head = _git("rev-parse", "--short=8", "HEAD", check=False)
                variants.append(Variant("worktree", args.setting, str(REPO), None, rev,
                                        f"the current working tree ({REPO}, HEAD {head} plus uncommitted changes)"))
                continue
            path, sha, subject = worktree_for(rev)
            name = sha[:8]
            while name in [v.name for v in variants]:
                name += "'"
            variants.append(Variant(name, args.setting, str(path), sha, rev, f"{rev} = {sha[:10]} {subject}"))
        return variants
    settings = args.compare_settings or [args.setting]
    return [
        Variant(s, s, str(REPO), None, None, " + ".join(SETTINGS[p][0] for p in setting_parts(s)))
        for s in settings
    ]


# ----------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------
class WorkerError(Exception):
    pass


def child_env(code: str, threads: int) -> dict:
    """This environment for a measured process: ``code`` first on PYTHONPATH, ``threads`` for OpenMP/MKL."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([code] + [p for p in [env.get("PYTHONPATH")] if p])
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class Worker:
    """One job process for one variant; speaks the line protocol of ``worker.py``."""

    def __init__(self, job: str, variant: Variant, args, ckpt: Path | None, log_path: Path):
        cmd = [sys.executable, str(WORKER), "--job", job, "--setting", variant.setting, "--size", str(args.size),
               "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device,
               "--dtype", args.dtype, "--warmup", str(args.warmup), "--max-new-tokens", str(args.max_new_tokens)]
        if ckpt is not None:
            cmd += ["--ckpt", str(ckpt)]
        env = child_env(variant.code, args.threads)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "a")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=variant.code)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise WorkerError(f"the job process exited (code {self.proc.returncode}) without an answer; "
                              f"log: {self.log_path}\n{self.log_tail()}")
        message = json.loads(line)
        if message.get("event") == "error":
            self.close()
            raise WorkerError(f"{message['error']} (log: {self.log_path})\n{message.get('traceback', '')}")
        return message

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _check_code(message: dict, variant: Variant, job: str) -> None:
    """Warn when the job process imported internvl_u_core from somewhere else than the code under test."""
    found = message.get("core_file")
    if found and not Path(found).resolve().is_relative_to(Path(variant.code).resolve()):
        message["code_mismatch"] = True
        log(f"[{job} | {variant.name}] WARNING: internvl_u_core came from {found}, not from {variant.code}")


def _short(run: dict) -> str:
    parts = [f"{run['total_s']:.2f} s"]
    if "dit_step_s" in run:
        parts.append(f"DiT {run['dit_step_s']:.2f} s/step")
    if "decode_tok_s" in run:
        parts.append(f"{run['decode_tok_s']:.1f} tok/s")
    if "ttft_s" in run:
        parts.append(f"first token {run['ttft_s']:.2f} s")
    return ", ".join(parts)


class Session:
    def __init__(self, args, variants: list[Variant], ckpt: Path | None, stamp: str):
        self.args = args
        self.variants = variants
        self.ckpt = ckpt
        self.stamp = stamp
        self.logs = CACHE / "logs" / stamp
        self.results: dict = {v.name: {} for v in variants}
        self.live: list[Worker] = []

    def _slot(self, variant: Variant, job: str) -> dict:
        return self.results[variant.name].setdefault(job, {"processes": [], "runs": [], "errors": []})

    def _start(self, job: str, variant: Variant, tag: str = "") -> tuple[Worker, dict] | None:
        slot = self._slot(variant, job)
        worker = Worker(job, variant, self.args, self.ckpt, self.logs / f"{job}-{variant.name}{tag}.log")
        self.live.append(worker)
        try:
            ready = worker.read()
        except WorkerError as exc:
            self._fail(slot, variant, job, exc, worker)
            return None
        warm = ready.pop("warmup", [])
        ready.pop("event", None)
        ready["warmup_runs"] = warm
        if warm:  # weights are memory-mapped: the first call after loading pages them in
            ready["first_run_s"] = warm[0]["total_s"]
        slot["processes"].append(ready)
        _check_code(ready, variant, job)
        warm_text = f"; warm-up {_short(warm[-1])}" if warm else ""
        log(f"[{job} | {variant.name}] loaded in {ready['load_s']:.1f} s "
            f"(RSS {ready.get('rss_after_load_gib')} GiB){warm_text}")
        return worker, ready

    def _fail(self, slot, variant, job, exc, worker=None) -> None:
        text = str(exc)
        slot["errors"].append({"error": text.splitlines()[0], "detail": text})
        log(f"[{job} | {variant.name}] FAILED: {text}")
        if worker is not None:
            worker.close()
            if worker in self.live:
                self.live.remove(worker)

    def _run(self, worker: Worker, job: str, variant: Variant, index: int) -> bool:
        slot = self._slot(variant, job)
        try:
            run = worker.send("run")
        except WorkerError as exc:
            self._fail(slot, variant, job, exc, worker)
            return False
        run.pop("event", None)
        slot["runs"].append(run)
        log(f"[{job} | {variant.name}] run {index + 1}/{self.args.repeats}: {_short(run)}")
        return True

    def _finish(self, worker: Worker, job: str, variant: Variant, profile: bool) -> None:
        slot = self._slot(variant, job)
        try:
            if profile and self.args.profile:
                base = CACHE / "profiles" / self.stamp / f"{job}-{variant.name}-{self.args.profile}"
                prof = worker.send(f"profile {self.args.profile} {base}")
                prof.pop("event", None)
                slot["profile"] = prof
                log(f"[{job} | {variant.name}] profile: {', '.join(prof['files'])}")
            done = worker.send("exit")
            done.pop("event", None)
            slot["processes"][-1].update(done)
            worker.close()
            self.live.remove(worker)
        except WorkerError as exc:
            self._fail(slot, variant, job, exc, worker)

    # -- job drivers ----------------------------------------------------------------------------
    def import_job(self) -> None:
        """A fresh interpreter per measurement; the first round warms the page cache and .pyc files."""
        rounds = self.args.warmup + self.args.repeats
        for r in range(rounds):
            for variant in self.variants:
                slot = self._slot(variant, "import")
                worker = Worker("import", variant, self.args, None, self.logs / f"import-{variant.name}.log")
                try:
                    message = worker.read()
                except WorkerError as exc:
                    self._fail(slot, variant, "import", exc)
                    continue
                finally:
                    worker.close()
                message.pop("event", None)
                _check_code(message, variant, "import")
                if r < self.args.warmup:
                    continue
                slot["runs"].append(message)
                log(f"[import | {variant.name}] run {r - self.args.warmup + 1}/{self.args.repeats}: "
                    f"{message['total_s']:.2f} s (torch {message['torch_s']:.2f} s, core {message['core_s']:.2f} s)")

    def paired(self, job: str) -> None:
        """One process per variant, all loaded and warmed up; timed runs alternate A, B, A, B ..."""
        workers = {}
        for variant in self.variants:
            started = self._start(job, variant)
            if started:
                workers[variant.name] = started[0]
        for r in range(self.args.repeats):
            for variant in self.variants:
                worker = workers.get(variant.name)
                if worker is not None and not self._run(worker, job, variant, r):
                    workers.pop(variant.name)
        for variant in self.variants:
            if variant.name in workers:
                self._finish(workers[variant.name], job, variant, profile=True)

    def isolated(self, job: str) -> None:
        """A fresh process (load + warm-up + one timed run) per run, variants alternating."""
        failed: set[str] = set()
        for r in range(self.args.repeats):
            for variant in self.variants:
                if variant.name in failed:
                    continue
                started = self._start(job, variant, tag=f"-{r + 1}")
                if not started or not self._run(started[0], job, variant, r):
                    failed.add(variant.name)
                    continue
                self._finish(started[0], job, variant, profile=r == self.args.repeats - 1)

    def run(self) -> None:
        for job in self.args.jobs:
            if job == "import":
                self.import_job()
            elif self.args.isolate:
                self.isolated(job)
            else:
                self.paired(job)
            for variant in self.variants:
                slot = self.results[variant.name].get(job)
                if slot is not None:
                    slot["summary"] = report.summarise(slot)

    def stop(self) -> None:
        for worker in list(self.live):
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
            worker._log.close()
        self.live.clear()


def _memory_warning(args, variants, ckpt: Path | None) -> None:
    if args.isolate or len(variants) < 2 or ckpt is None or args.device != "cpu":
        return
    size = sum(f.stat().st_size for f in ckpt.rglob("*.safetensors"))
    per_process = size * (1.0 if args.dtype == "float32" else 0.5) * 1.8
    try:
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    if per_process * len(variants) > available:
        log(f"warning: {len(variants)} job processes of about {per_process / 2**30:.1f} GiB each stay loaded side "
            f"by side but only {available / 2**30:.1f} GiB is available; consider --isolate")


def build_document(args, machine, variants, session, ckpt, started, interrupted) -> dict:
    machine["loadavg_end"] = _loadavg()
    names = [v.name for v in variants]
    doc = {
        "schema": 1,
        "created": started,
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "command": [sys.executable, *sys.argv],
        "machine": machine,
        "config": {
            "layers": args.layer_counts, "vocab": args.vocab or 151936, "size": args.size, "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup, "threads": args.threads, "device": args.device, "dtype": args.dtype,
            "jobs": args.jobs, "max_new_tokens": args.max_new_tokens, "isolate": args.isolate,
            "checkpoint": str(ckpt) if ckpt else None,
            "mode": "commits" if args.compare_commits else "settings",
        },
        "variants": [asdict(v) for v in variants],
        "results": session.results,
        "ratios": report.ratios(session.results, names),
        "paired_ratios": report.paired_ratios(session.results, names),
    }
    if report.reference_applies(doc["config"]):
        doc["reference"] = {"config": report.REFERENCE_CONFIG, "numbers": report.REFERENCE,
                            "note": "the reference implementation's published measurements on this machine class"}
        doc["vs_reference"] = report.vs_reference(session.results, names)
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.show:
        print(report.markdown(json.loads(args.show.read_text())))
        return 0
    try:
        validate(args)
        machine = machine_info(args)
        variants = make_variants(args)
        needs_ckpt = any(job != "import" for job in args.jobs)
        ckpt = ensure_checkpoint(args.layers, say=log, vocab=args.vocab) if needs_ckpt else None
    except (BenchError, RuntimeError) as exc:
        log(f"error: {exc}")
        return 2
    _memory_warning(args, variants, ckpt)
    started = _dt.datetime.now().astimezone()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    out_path = args.json or RESULTS / f"{stamp}.json"
    log(f"benchmark: {', '.join(args.jobs)} | variants: {', '.join(v.name for v in variants)} | "
        f"checkpoint: {ckpt} | logs: {CACHE / 'logs' / stamp}")
    session = Session(args, variants, ckpt, stamp)
    interrupted = False
    t0 = time.perf_counter()
    try:
        session.run()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured so far")
        session.stop()
        for per_variant in session.results.values():
            for slot in per_variant.values():
                slot["summary"] = report.summarise(slot)
    doc = build_document(args, machine, variants, session, ckpt, started.isoformat(timespec="seconds"), interrupted)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out_path)
    print(report.markdown(doc))
    log(f"\nresults: {out_path}")
    failed = any(slot.get("errors") for per in session.results.values() for slot in per.values())
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
