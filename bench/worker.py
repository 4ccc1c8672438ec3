"""Benchmark child process: one job, one setting, one copy of the code under test.

Started by ``bench/run.py``; not meant to be run by hand. The code under test is whatever
``internvl_u_core`` the interpreter finds first (``run.py`` puts the checkout or git worktree
under test at the front of ``PYTHONPATH``); this file always comes from the current checkout.

Protocol (one JSON object per line on the original stdout; library output goes to stderr):

* ``--job import``: time the imports in this fresh interpreter, print ``{"event": "import", ...}``, exit.
* any other job: load the pipeline, apply the setting, run ``--warmup`` untimed runs, print
  ``{"event": "ready", ...}``; then for each line on stdin: ``run`` → one timed run →
  ``{"event": "run", ...}``; ``profile`` → one profiled run → ``{"event": "profile", ...}``;
  ``exit`` or end of input → ``{"event": "done", ...}`` (peak memory) and exit.
  Any failure → ``{"event": "error", "error": ..., "traceback": ...}`` and exit code 1.

Only the standard library is imported at module level, so the import timing starts from a bare
interpreter.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

GIB = 1024**3

PROMPT = "A red fox sitting in the snow under a pine tree, golden hour, highly detailed"
INSTRUCTION = "Make the sky purple and add a glowing moon"
QUESTION = "Describe this picture in detail."
COT_PROMPT = "A poster for a jazz night in Lisbon"

JOBS = ("import", "t2i", "edit", "understand", "cot")


# ----------------------------------------------------------------------------------------------
# Settings presets: name -> (description, needs CUDA, apply(pipe, device))
# ----------------------------------------------------------------------------------------------
def _no_dedupe(pipe, device):
    _require_attr(pipe, "dedupe_guidance_rows", "no_dedupe")
    pipe.dedupe_guidance_rows = False


def _vae_3d(pipe, device):
    codec = getattr(pipe, "codec", None)
    if hasattr(getattr(codec, "frames", None), "fast_path"):
        codec.frames.fast_path = False
    else:  # code from before the SingleFrameVAE class
        _require_attr(pipe.vae, "single_frame_2d", "vae_3d")
        pipe.vae.single_frame_2d = False


def _offload(pipe, device):
    _require_attr(pipe, "enable_model_cpu_offload", "offload")
    pipe.enable_model_cpu_offload(device)


def _vae_tiling(pipe, device):
    _require_attr(pipe, "enable_vae_tiling", "vae_tiling")
    pipe.enable_vae_tiling()


def _fbcache(pipe, device):
    from diffusers.hooks import FirstBlockCacheConfig

    _require_attr(pipe.generation_decoder.decoder, "enable_cache", "fbcache")
    pipe.generation_decoder.decoder.enable_cache(FirstBlockCacheConfig(threshold=0.05))


def _compile(pipe, device):
    _require_attr(pipe, "compile_transformer", "compile")
    pipe.compile_transformer()


def _require_attr(obj, name, setting):
    if not hasattr(obj, name):
        raise RuntimeError(f"setting {setting!r} needs {type(obj).__name__}.{name}, which this code does not have")


SETTINGS = {
    "default": ("the pipeline as loaded", False, ()),
    "no_dedupe": ("pipe.dedupe_guidance_rows = False (LLM/DiT run every guidance row)", False, (_no_dedupe,)),
    "vae_3d": ("pipe.codec.frames.fast_path = False (VAE through diffusers' vae.encode/decode: 3-D convolutions, "
               "frame cache)", False, (_vae_3d,)),
    "reference_like": ("no_dedupe + vae_3d: the reference's amount of work", False, (_no_dedupe, _vae_3d)),
    "offload": ("pipe.enable_model_cpu_offload(device): components on the CPU, moved to the GPU to run",
                True, (_offload,)),
    "vae_tiling": ("pipe.enable_vae_tiling(): VAE encode/decode in overlapping tiles", False, (_vae_tiling,)),
    "fbcache": ("DiT first-block cache, threshold 0.05 (lossy: bench/cache_drift.py measures the drift)", False,
                (_fbcache,)),
    "compile": ("pipe.compile_transformer(): regional torch.compile of the DiT blocks (the warm-up run compiles)",
                False, (_compile,)),
    # Load-time settings (LOAD_OPTIONS): passed to from_pretrained instead of applied afterwards.
    "int8": ("from_pretrained(quantization='int8'): CPU dynamic int8 / CUDA torchao int8 for the LLM and DiT",
             False, ()),
    "bf16": ("from_pretrained(quantization='bf16'): bfloat16 LLM and DiT, ViT and VAE in --dtype", False, ()),
    "fp8": ("from_pretrained(quantization='fp8'): torchao float8 weights for the LLM and DiT", True, ()),
    "nf4": ("from_pretrained(quantization='nf4'): bitsandbytes 4-bit NF4 for the LLM and DiT", True, ()),
    "group_offload": ("from_pretrained(offload='group'): ViT/LLM/DiT blocks streamed to the GPU one at a time",
                      True, ()),
    "sequential_offload": ("from_pretrained(offload='sequential'): every layer moved to the GPU for its own call",
                           True, ()),
}
LOAD_OPTIONS = {
    "int8": {"quantization": "int8"},
    "bf16": {"quantization": "bf16"},
    "fp8": {"quantization": "fp8"},
    "nf4": {"quantization": "nf4"},
    "group_offload": {"offload": "group"},
    "sequential_offload": {"offload": "sequential"},
}


def setting_parts(setting: str) -> list[str]:
    """``"offload+vae_tiling"`` → ``["offload", "vae_tiling"]`` (unknown names raise ``ValueError``)."""
    parts = [p for p in setting.split("+") if p]
    if not parts:
        raise ValueError("empty setting name")
    for part in parts:
        if part not in SETTINGS:
            raise ValueError(f"unknown setting {part!r}; known: {', '.join(SETTINGS)} (combine with '+')")
    return parts


def setting_needs_cuda(setting: str) -> bool:
    return any(SETTINGS[p][1] for p in setting_parts(setting))


def load_options(setting: str) -> dict:
    """``from_pretrained`` keyword arguments of the load-time parts of ``setting``."""
    options: dict = {}
    for part in setting_parts(setting):
        options.update(LOAD_OPTIONS.get(part, {}))
    return options


def apply_setting(pipe, setting: str, device: str) -> None:
    for part in setting_parts(setting):
        for apply in SETTINGS[part][2]:
            apply(pipe, device)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs``), so VmHWM covers one run only.

    This also lowers ``ru_maxrss``; callers keep the process-wide maximum themselves.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _gib(value):
    return None if value is None else round(value / GIB, 3)


# ----------------------------------------------------------------------------------------------
# Timing of stages: wrap a few methods of the loaded pipeline (exclusive times, nesting-safe)
# ----------------------------------------------------------------------------------------------
class StageTimer:
    """Records the exclusive wall time of each wrapped call and when it ended."""

    def __init__(self, sync):
        self.sync = sync
        self.records: list[tuple[float, str, float]] = []  # (end time, stage, exclusive seconds)
        self._stack: list[list[float]] = []  # per active call: [time spent in nested timed calls]

    def reset(self):
        self.records = []
        self._stack = []

    def wrap(self, obj, attr: str, stage: str) -> bool:
        original = getattr(obj, attr, None)
        if original is None or not callable(original):
            return False
        timer = self

        def timed(*args, **kwargs):
            timer.sync()
            start = time.perf_counter()
            timer._stack.append([0.0])
            try:
                return original(*args, **kwargs)
            finally:
                timer.sync()
                end = time.perf_counter()
                child = timer._stack.pop()[0]
                elapsed = end - start
                if timer._stack:
                    timer._stack[-1][0] += elapsed
                timer.records.append((end, stage, elapsed - child))

        setattr(obj, attr, timed)
        return True


def install_stage_timers(pipe, timer: StageTimer) -> list[str]:
    wrapped = []
    # The VAE stages are timed where the pipeline calls them: its latent codec, whichever path it takes
    # inside (the single-frame encoder/decoder, or vae.encode/decode when tiling or falling back).
    # Code without a codec called vae.encode/decode directly.
    vae_entry = getattr(pipe, "codec", None) or getattr(pipe, "vae", None)
    targets = [
        (getattr(pipe, "vlm", None), "extract_feature", "vit"),
        (getattr(pipe, "vlm", None), "hidden_states_for_generation", "llm"),
        (vae_entry, "encode", "vae_encode"),
        (vae_entry, "decode", "vae_decode"),
    ]
    for obj, attr, stage in targets:
        if obj is not None and timer.wrap(obj, attr, stage):
            wrapped.append(stage)
    return wrapped


def test_image(size: int):
    """A deterministic, structured RGB picture (gradients, a disc and a checkerboard corner)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    r = 255 * x
    g = 255 * y
    b = 255 * (0.5 + 0.5 * np.sin(6.283 * (x + y)))
    disc = (x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05
    r[disc], g[disc], b[disc] = 240, 200, 40
    checker = ((np.floor(x * 8) + np.floor(y * 8)) % 2 == 0) & (x < 0.3) & (y > 0.7)
    r[checker], g[checker], b[checker] = 20, 20, 20
    array = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args):
        self.args = args
        import torch

        self.torch = torch
        self.cuda = args.device.startswith("cuda")
        self.timer = StageTimer(self.sync)
        self.pipe = None
        self.image = None
        self.wrapped: list[str] = []
        self.peak_rss = 0  # process-wide maximum, kept across the per-run high-water resets
        self.gpu_peak = 0

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def load(self) -> dict:
        args, torch = self.args, self.torch
        t0 = time.perf_counter()
        from internvl_u_core import InternVLUPipeline

        import_s = time.perf_counter() - t0
        # Offload keeps the components on the CPU: load them there, never on the GPU as a whole.
        needs_offload = "offload" in setting_parts(args.setting)
        load_device = "cpu" if needs_offload else args.device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        self.pipe = InternVLUPipeline.from_pretrained(
            args.ckpt, torch_dtype=args.dtype, device=load_device, **load_options(args.setting)
        )
        self.sync()
        load_s = time.perf_counter() - t0
        apply_setting(self.pipe, args.setting, args.device)
        self.wrapped = install_stage_timers(self.pipe, self.timer)
        if args.job in ("edit", "understand"):
            self.image = test_image(args.size)
        info = {
            "core_import_s": round(import_s, 4),
            "load_s": round(load_s, 4),
            "rss_after_load_gib": _gib(current_rss_bytes()),
            # Mapped weight pages (file) can be dropped by the kernel under pressure; anonymous memory cannot.
            "rss_anon_after_load_gib": _gib(_status_bytes("RssAnon")),
            "rss_file_after_load_gib": _gib(_status_bytes("RssFile")),
            "model_gib": _gib(self.pipe.model_size_bytes()),
            "peak_rss_load_gib": _gib(peak_rss_bytes()),
            "stages_timed": self.wrapped,
        }
        if self.cuda:
            info["gpu_alloc_after_load_gib"] = _gib(torch.cuda.memory_allocated())
            self.gpu_peak = torch.cuda.max_memory_allocated()
            info["gpu_peak_load_gib"] = _gib(self.gpu_peak)
            torch.cuda.reset_peak_memory_stats()
        return info

    # -- one run of the job ---------------------------------------------------------------------
    def run_once(self) -> dict:
        job = self.args.job
        self.timer.reset()
        steps: list[float] = []
        tokens: list[float] = []

        def on_step(step, total, latents):
            self.sync()
            steps.append(time.perf_counter())

        def on_token(step, total):
            self.sync()
            tokens.append(time.perf_counter())

        args, pipe, torch = self.args, self.pipe, self.torch
        extra: dict = {}
        # Memory of this run alone: reset the high-water marks, remember the baseline.
        self.peak_rss = max(self.peak_rss, peak_rss_bytes())
        rss_reset = reset_rss_peak()
        rss_before = current_rss_bytes()
        if self.cuda:
            self.sync()
            self.gpu_peak = max(self.gpu_peak, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            gpu_before = torch.cuda.memory_allocated()
        self.sync()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        if job == "t2i":
            pipe.generate(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=0, callback=on_step)
        elif job == "edit":
            pipe.edit(self.image, INSTRUCTION, steps=args.steps, seed=0, width=args.size, height=args.size,
                      callback=on_step)
        elif job == "understand":
            # understand() cannot force a length; random weights may stop at once. The reference-style
            # call takes min_new_tokens, so every run decodes exactly max_new_tokens tokens.
            out = pipe(QUESTION, self.image, "text", max_new_tokens=args.max_new_tokens,
                       min_new_tokens=args.max_new_tokens, token_callback=on_token)
            extra["tokens"] = int(out.generate_output.shape[1])
        elif job == "cot":
            # reason() + generate(reasoning=...) is this call split in two; the reference-style call
            # forces the chain-of-thought length with min_new_tokens.
            out = pipe(COT_PROMPT, generation_mode="text_image", max_new_tokens=args.max_new_tokens,
                       min_new_tokens=args.max_new_tokens, num_inference_steps=args.steps, height=args.size,
                       width=args.size, generator=torch.Generator().manual_seed(0), callback=on_step,
                       token_callback=on_token)
            extra["tokens"] = int(out.generate_output.shape[1])
        else:
            raise ValueError(f"unknown job {job!r}")
        self.sync()
        t1 = time.perf_counter()
        # CPU time of this process over wall time x threads: well below 1 means waiting (other
        # processes on the cores, I/O) or single-threaded stretches; compare it between runs.
        extra["cpu_util"] = round((time.process_time() - cpu0) / max(t1 - t0, 1e-9) / self.args.threads, 3)
        hwm = _status_bytes("VmHWM")
        if rss_reset and hwm is not None and rss_before is not None:
            extra["run_peak_rss_gib"] = _gib(hwm)
            extra["run_extra_rss_gib"] = _gib(hwm - rss_before)  # activations, workspaces, newly paged weights
        if self.cuda:
            extra["gpu_run_peak_gib"] = _gib(torch.cuda.max_memory_allocated())
            extra["gpu_run_extra_gib"] = _gib(torch.cuda.max_memory_allocated() - gpu_before)
        return {**self.metrics(t0, t1, steps, tokens), **extra}

    def metrics(self, t0, t1, steps, tokens) -> dict:
        """Total, stage times, DiT per step (from the step callbacks) and token timings."""
        m: dict = {"total_s": t1 - t0}
        if tokens:
            m["ttft_s"] = tokens[0] - t0
            m["generated"] = len(tokens)
            if len(tokens) > 1:
                m["decode_tok_s"] = (len(tokens) - 1) / (tokens[-1] - tokens[0])
        # Image phase: after the last token of a chain-of-thought (cot), else the whole call.
        image_start = tokens[-1] if tokens and steps else t0
        records = [r for r in self.timer.records if r[0] >= image_start] if steps else self.timer.records
        stages: dict[str, float] = {}
        for _, stage, seconds in records:
            stages[stage] = stages.get(stage, 0.0) + seconds
        for name in ("vit", "llm", "vae_encode", "vae_decode"):
            if name in stages:
                m[f"{name}_s"] = stages[name]
        if "vit" in stages or "llm" in stages:
            m["vlm_s"] = stages.get("vit", 0.0) + stages.get("llm", 0.0)
        if steps:
            if tokens:
                m["reason_s"] = image_start - t0
            m["image_s"] = t1 - image_start
            # The DiT stage starts when the last conditioning stage before the first step ended.
            before = [end for end, _, _ in records if end <= steps[0]]
            start = max(before) if before else image_start
            m["dit_s"] = steps[-1] - start
            m["dit_first_step_s"] = steps[0] - start
            diffs = [b - a for a, b in zip(steps, steps[1:])]
            m["dit_step_s"] = statistics.median(diffs) if diffs else m["dit_s"]
            # Processor, prompt assembly, pixel conversion, resizing, offload moves ...
            m["other_s"] = max(0.0, m["image_s"] - sum(stages.values()) - m["dit_s"])
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()}

    def profile(self, kind: str, out_base: str) -> dict:
        os.makedirs(os.path.dirname(out_base) or ".", exist_ok=True)
        if kind == "cprofile":
            import cProfile
            import io
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            result = self.run_once()
            profiler.disable()
            profiler.dump_stats(out_base + ".prof")
            text = io.StringIO()
            for order in ("tottime", "cumulative"):
                text.write(f"==== sorted by {order} ====\n")
                pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(40)
            files = [out_base + ".prof", out_base + ".txt"]
        else:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            with profile(activities=activities, record_shapes=True) as prof:
                result = self.run_once()
            sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            text = prof.key_averages().table(sort_by=sort, row_limit=40)
            shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25)
            text = f"==== by operator ({sort}) ====\n{text}\n==== by operator and input shape ====\n{shapes}\n"
            prof.export_chrome_trace(out_base + ".trace.json")
            files = [out_base + ".txt", out_base + ".trace.json"]
        with open(out_base + ".txt", "w") as fh:
            fh.write(text if isinstance(text, str) else text.getvalue())
        return {"files": files, "run": result}

    def memory(self) -> dict:
        """Whole-process peaks (load, warm-up and every run)."""
        info = {"peak_rss_gib": _gib(max(self.peak_rss, peak_rss_bytes())), "rss_end_gib": _gib(current_rss_bytes()),
                "rss_anon_end_gib": _gib(_status_bytes("RssAnon")), "rss_file_end_gib": _gib(_status_bytes("RssFile"))}
        if self.cuda:
            torch = self.torch
            info["gpu_peak_gib"] = _gib(max(self.gpu_peak, torch.cuda.max_memory_allocated()))
            info["gpu_peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
        return info


# ----------------------------------------------------------------------------------------------
def import_job() -> dict:
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import internvl_u_core

    t2 = time.perf_counter()
    from internvl_u_core import InternVLUPipeline  # noqa: F401

    t3 = time.perf_counter()
    return {
        "event": "import",
        "torch_s": round(t1 - t0, 4),
        "core_s": round(t2 - t1, 4),  # import internvl_u_core, torch already loaded
        "pipeline_class_s": round(t3 - t2, 4),  # from internvl_u_core import InternVLUPipeline afterwards
        "total_s": round(t3 - t0, 4),
        "interpreter_s": round(t0 - _T_START, 4),
        "core_file": internvl_u_core.__file__,
        "torch_version": torch.__version__,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", required=True, choices=JOBS)
    p.add_argument("--ckpt")
    p.add_argument("--setting", default="default")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol channel: the original stdout
    os.dup2(2, 1)  # anything else printing to stdout lands on stderr (the log)
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        proto.write(json.dumps(message) + "\n")
        proto.flush()

    args = parse_args(argv)
    try:
        if args.job == "import":
            send(import_job())
            return 0
        import torch

        torch.set_num_threads(args.threads)
        if args.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(f"--device {args.device}: CUDA is not available to torch {torch.__version__}")
            index = torch.device(args.device).index
            if index is not None:  # memory statistics and synchronize() then refer to this GPU
                torch.cuda.set_device(index)
        runner = Runner(args)
        ready = {"event": "ready", **runner.load()}
        import internvl_u_core

        ready.update({
            "core_file": internvl_u_core.__file__,
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        })
        if runner.cuda:
            ready["gpu_name"] = torch.cuda.get_device_name(torch.device(args.device))
        warm = []
        for _ in range(args.warmup):
            warm.append(runner.run_once())
        ready["warmup"] = warm
        send(ready)
        for line in sys.stdin:
            command = line.strip().split()
            if not command:
                continue
            if command[0] == "run":
                send({"event": "run", **runner.run_once()})
            elif command[0] == "profile":
                send({"event": "profile", **runner.profile(command[1], command[2])})
            elif command[0] == "exit":
                break
        send({"event": "done", **runner.memory()})
        return 0
    except BaseException as exc:  # report every failure on the protocol channel, then exit non-zero
        send({"event": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return 1


if __name__ == "__main__":
    sys.exit(main())
