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

