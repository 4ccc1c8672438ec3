"""The benchmark checkpoint: random weights, released layout and widths, a chosen number of layers.

Built once into ``bench/.cache/ckpt-l{L}`` (``ckpt-lall`` for the released layer counts) and reused.
The build writes into a temporary folder in the same directory and renames it into place at the
end, so an interrupted build is never mistaken for a finished one.

``python bench/checkpoint.py OUT_DIR VIT LLM DIT VOCAB DTYPE`` is the build step (run in a subprocess by
``run.py`` so the parent process stays small).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = BENCH / ".cache"
PROCESSOR_SOURCE = REPO / "tests" / "fixtures" / "internvlu-tiny" / "checkpoint"
RELEASED_LAYERS = {"vit": 24, "llm": 28, "dit": 20}  # = internvl_u_core.random_checkpoint.RELEASED_*
META = "bench_checkpoint.json"


def layer_counts(layers: str) -> dict[str, int]:
    """``"4"`` → 4 layers in each of ViT, LLM and DiT; ``"all"`` → the released counts."""
    if str(layers).strip().lower() in ("all", "full"):
        return dict(RELEASED_LAYERS)
    count = int(layers)
    if count < 1:
        raise ValueError(f"--layers must be >= 1 or 'all', got {layers}")
    return {"vit": count, "llm": count, "dit": count}


def checkpoint_dir(layers: str, vocab: int | None = None, cache: Path = CACHE, dtype: str = "float32") -> Path:
    key = "all" if str(layers).strip().lower() in ("all", "full") else str(int(layers))
    name = f"ckpt-l{key}" if vocab is None else f"ckpt-l{key}-v{vocab}"
    return cache / (name if dtype == "float32" else f"{name}-{dtype}")


def read_layers(folder: Path) -> dict[str, int]:
    vlm = json.loads((folder / "vlm" / "config.json").read_text())
    gen = json.loads((folder / "generation_decoder" / "config.json").read_text())
    return {
        "vit": vlm["vision_config"]["num_hidden_layers"],
        "llm": vlm["llm_config"]["num_hidden_layers"],
        "dit": gen["decoder_config"]["num_layers"],
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(final: Path) -> None:
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_checkpoint(
    layers: str, say=print, vocab: int | None = None, cache: Path = CACHE, dtype: str = "float32"
) -> Path:
    """The cached checkpoint for ``layers`` (and LLM vocabulary size; None = released), built first if missing.

    ``dtype`` is the stored dtype (``float32`` or ``bfloat16``, half the size); ``cache`` the parent folder.
    """
    counts = layer_counts(layers)
    final = checkpoint_dir(layers, vocab, cache, dtype)
    if (final / "model_index.json").is_file():  # model_index.json is written last by the writer
        found = read_layers(final)
        if found != counts:
            raise RuntimeError(f"{final} holds layers {found}, expected {counts}; delete it to rebuild")
        return final
    if final.exists():
        raise RuntimeError(f"{final} exists but is not a finished checkpoint; delete it to rebuild")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(final.parent).free
    estimate = _estimate_bytes(counts) // (1 if dtype == "float32" else 2)
    if free < estimate * 1.1:
        raise RuntimeError(f"building {final.name} needs about {estimate / 2**30:.1f} GiB of disk; "
                           f"{free / 2**30:.1f} GiB free under {final.parent}")
    say(f"building the random-weight checkpoint {final} (layers {counts}, about {estimate / 2**30:.1f} GiB; "
        "done once) ...")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, str(Path(__file__).resolve()), str(tmp), str(counts["vit"]), str(counts["llm"]),
           str(counts["dit"]), str(vocab or 0), dtype]
    try:
        subprocess.run(cmd, env=env, check=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / "model_index.json").is_file():  # another run finished the same build first
            return final
        raise
    return final


def _estimate_bytes(counts: dict[str, int]) -> int:
    """Float32 file sizes, from the 4-layer build (per layer + fixed parts)."""
    vit, llm, dit, fixed = 50.4e6, 201.3e6, 358.8e6, 1.87e9
    return int(vit * counts["vit"] + llm * counts["llm"] + dit * counts["dit"] + fixed)


def _build(out: str, vit: int, llm_layers: int, dit: int, vocab: int = 0, dtype: str = "float32") -> None:
    import torch

    from internvl_u_core.random_checkpoint import write_random_checkpoint

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    llm = {"vocab_size": vocab} if vocab else None
    write_random_checkpoint(out, processor_source=PROCESSOR_SOURCE, vit_layers=vit, llm_layers=llm_layers,
                            dit_layers=dit, llm=llm, dtype=getattr(torch, dtype))
    meta = {"layers": {"vit": vit, "llm": llm_layers, "dit": dit}, "vocab_size": vocab or 151936, "seed": 0,
            "dtype": dtype}
    Path(out, META).write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    _build(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
