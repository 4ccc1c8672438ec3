"""The prepared GPU check runs its CPU fallback end to end (tiny checkpoint, 64², 2 steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_fallback(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(out), "--cache", str(tmp_path / "cache"),
         "--runs", "1", "--warmup", "0", "--threads", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "gpu-check.json").read_text())
    assert doc["device"] == "cpu" and doc["config"]["size"] == 64 and doc["config"]["steps"] == 2
    variants = doc["ours"]["variants"]
    assert set(variants) == {"native", "_native_math", "native-fbcache-0.05", "native-compiled-eager"}
    for name, variant in variants.items():
        assert variant["total_median_s"] > 0 and variant["dit_step_median_s"] > 0, name
    # Compiling the blocks changes no number; another SDPA kernel only rounds differently in bf16.
    assert doc["image_differences"]["native-compiled-eager"] == {"mean_levels": 0.0, "max_levels": 0}
    assert doc["image_differences"]["_native_math"]["mean_levels"] < 4
    assert doc["reference"] == {"skipped": "no --reference folder given"}
    # Text-to-image: two guidance rows (the dropped rows are computed once), 4×4 target tokens each plus text.
    rows = doc["dit_flops"]["rows_tokens"]
    assert len(rows) == 2 and all(n > 16 for n in rows)
    assert doc["dit_flops"]["tflop_per_call"] > 0
    assert (out / "ours-native.png").is_file() and (out / "ours-native-compiled-eager.png").is_file()
    assert "| native |" in done.stdout
    # The quantisation ladder: the CPU modes against float32 (offload rungs need a GPU).
    ladder = doc["ladder"]["variants"]
    assert list(ladder) == ["float32", "int8", "bf16"]
    assert ladder["int8"]["quantization"].startswith("int8 (torch.ao dynamic int8")
    for name in ("int8", "bf16"):
        assert ladder[name]["t2i"]["total_s"] > 0 and ladder[name]["understand"]["decode_tok_s"] > 0, name
        assert ladder[name]["t2i_drift"]["psnr_db"] > 20 and 0.9 < ladder[name]["text_drift"]["cosine_median"] < 1
    assert (out / "ladder" / "int8-t2i.png").is_file() and "| int8 |" in done.stdout
    # The LoRA training step (CUDA: 1024², bf16, released depths), here its CPU path.
    lora = doc["lora"]
    assert lora["gradient_checkpointing"] and lora["size"] == 64 and lora["step_median_s"] > 0
    assert lora["trainable_params"] > 0 and lora["peak_memory_gib"] > 0 and "LoRA training step:" in done.stdout
