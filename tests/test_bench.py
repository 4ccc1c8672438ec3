"""The benchmark's stage timers see the stages the pipeline really runs (bench/worker.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import load_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import worker  # noqa: E402


def test_stage_timers_record_vit_llm_and_both_vae_stages(tiny_pipe):
    timer = worker.StageTimer(sync=lambda: None)
    wrapped = worker.install_stage_timers(tiny_pipe, timer)
    try:
        tiny_pipe.edit(load_inputs("internvlu-tiny", "img_fox_80x60.png"), "make it blue", steps=1, seed=0,
                       width=32, height=32)
    finally:  # drop the timing wrappers from the shared pipeline
        for part in (tiny_pipe.vlm, tiny_pipe.codec):
            for attr in ("extract_feature", "hidden_states_for_generation", "encode", "decode"):
                vars(part).pop(attr, None)
    assert wrapped == ["vit", "llm", "vae_encode", "vae_decode"]
    assert {stage for _, stage, _ in timer.records} == {"vit", "llm", "vae_encode", "vae_decode"}


def test_gpu_quant_check_runs_its_cpu_fallback(tmp_path):
    """Without CUDA the GPU check of the quantisation ladder runs the same path at tiny sizes."""
    import json
    import os
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench"
    done = subprocess.run(
        [sys.executable, str(bench / "gpu_quant_check.py"), "--cpu", "--variants", "int8", "--out", str(tmp_path),
         "--threads", "1"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(bench.parent)}, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_quant_check.json").read_text())
    assert doc["device"] == "cpu" and list(doc["variants"]) == ["float32", "int8"]
    int8 = doc["variants"]["int8"]
    assert int8["quantization"].startswith("int8 (torch.ao dynamic int8")
    assert int8["t2i"]["total_s"] > 0 and int8["understand"]["decode_tok_s"] > 0
    assert int8["t2i_drift"]["psnr_db"] > 30 and 0.9 < int8["text_drift"]["cosine_median"] < 1
    assert (tmp_path / "int8-t2i.png").is_file()
