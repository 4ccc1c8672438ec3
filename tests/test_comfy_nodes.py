"""Node declarations (ids, tooltips, V3 rules) and runtime behaviour: interrupt, unload, loader."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from internvl_u_core import DEFAULT_LIMITS, CheckpointNotDownloaded  # noqa: E402
from nodes import all_specs  # noqa: E402
from nodes.comfy_runtime import ProcessingInterrupted, request_interrupt  # noqa: E402
from nodes.images import pils_to_tensor, tensor_to_pils  # noqa: E402
from nodes.schema import CATEGORY, object_info  # noqa: E402

COMFY_MAX_SEED = 0xFFFFFFFFFFFFFFFF  # the largest value ComfyUI's seed widgets hold

TINY = ROOT / "tests" / "fixtures" / "internvlu-tiny"
SPECS = {spec.node_id: spec for spec in all_specs()}
FOX = TINY / "inputs" / "img_fox_80x60.png"

# --- declarations ---------------------------------------------------------------------------


def test_node_set() -> None:
    assert sorted(SPECS) == [
        "InternVLU_Edit",
        "InternVLU_Generate",
        "InternVLU_Loader",
        "InternVLU_Reason",
        "InternVLU_Understand",
        "InternVLU_Unload",
    ]


@pytest.mark.parametrize("node_id", sorted(SPECS))
def test_identity_and_tooltips(node_id: str) -> None:
    spec = SPECS[node_id]
    assert spec.category == CATEGORY == "InternVL-U"
    assert spec.display_name.startswith("InternVL-U ")
    assert spec.description
    for item in (*spec.inputs, *spec.outputs):
        assert item.tooltip and len(item.tooltip) > 10, f"{node_id}.{item.name} needs a tooltip"


@pytest.mark.parametrize("node_id", sorted(SPECS))
def test_v3_schema_rules(node_id: str) -> None:
    spec = SPECS[node_id]
    names = [i.name for i in spec.inputs] + [o.name for o in spec.outputs]
    assert len(names) == len(set(names)), "V3 needs ids unique across inputs and outputs"
    for inp in spec.inputs:
        if inp.type == "INT":
            assert inp.max is not None, "without max the frontend caps INT widgets at 2048"
        if inp.name == "seed":
            assert (inp.min, inp.max) == (0, DEFAULT_LIMITS.max_seed) and inp.control_after_generate
            assert inp.max <= COMFY_MAX_SEED
        if inp.type == "COMBO" and not callable(inp.options):
            assert inp.default in inp.option_list()


def test_object_info_shape() -> None:
    info = object_info(SPECS["InternVLU_Generate"])
    assert info["output"] == ["IMAGE"]
    assert info["input_order"]["required"][:2] == ["model", "prompt"]
    assert info["input"]["optional"]["reasoning"][0] == "INTERNVLU_REASONING"
    assert info["input"]["required"]["seed"][1]["control_after_generate"] == "randomize"


def test_image_conversion_round_trips_exactly() -> None:
    picture = Image.open(FOX).convert("RGB")
    tensor = pils_to_tensor([picture, picture])
    assert tensor.shape == (2, 60, 80, 3) and tensor.dtype == torch.float32
    back = tensor_to_pils(tensor)
    assert np.array_equal(np.asarray(back[1]), np.asarray(picture))


# --- runtime --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models") / "internvl_u"
    models.mkdir()
    (models / "InternVL-U").symlink_to(TINY / "checkpoint", target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("INTERNVLU_MODELS_DIR", str(models))
    yield models
    patch.undo()


@pytest.fixture(scope="module")
def model(models_dir: Path) -> Any:
    return (
        SPECS["InternVLU_Loader"]
        .run(checkpoint="InternVL-U", dtype="fp32", device="cpu", memory="keep_loaded")
        .values[0]
    )


def _generate(model: Any, **overrides: Any) -> torch.Tensor:
    kwargs = dict(
        model=model,
        prompt="a lighthouse at dusk",
        width=32,
        height=32,
        steps=2,
        all_cfg_scale=0.0,
        part_cfg_scale=0.0,
        seed=11,
        batch_size=1,
    )
    return SPECS["InternVLU_Generate"].run(**(kwargs | overrides)).values[0]


def _understand(model: Any) -> str:
    return (
        SPECS["InternVLU_Understand"]
        .run(
            model=model,
            image=pils_to_tensor([Image.open(FOX).convert("RGB")]),
            question="What?",
            max_new_tokens=6,
            do_sample=False,
            temperature=1.0,
            top_p=1.0,
            num_beams=1,
            seed=0,
        )
        .text
    )


def test_loader_lists_local_folders_and_hub_ids(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = SPECS["InternVLU_Loader"].input("checkpoint").option_list
    # models/internvl_u/InternVL-U is where the hub id would be downloaded to: listed once
    assert options() == ["InternVL-U"]
    (tmp_path / "group" / "mine").mkdir(parents=True)
    (tmp_path / "group" / "mine" / "model_index.json").write_text("{}")
    monkeypatch.setenv("INTERNVLU_MODELS_DIR", str(tmp_path))
    assert options() == ["group/mine", "InternVL-U/InternVL-U"]


def test_loader_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNVLU_MODELS_DIR", str(tmp_path))
    loader = SPECS["InternVLU_Loader"]
    with pytest.raises(FileNotFoundError, match="allow_download"):
        loader.run(checkpoint="InternVL-U/InternVL-U", dtype="auto", device="cpu", memory="keep_loaded")
    with pytest.raises(FileNotFoundError, match="No InternVL-U checkpoint named 'nope'"):
        loader.run(checkpoint="nope", dtype="auto", device="cpu", memory="keep_loaded")
    # Downloads go through the core's one hub download (allow-list, offline mode, clear errors).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotDownloaded, match="InternVL-U/InternVL-U"):
        loader.run(checkpoint="InternVL-U/InternVL-U", dtype="auto", device="cpu", memory="keep_loaded",
                   allow_download=True)


def test_equal_settings_share_one_model(model: Any) -> None:
    again = (
        SPECS["InternVLU_Loader"]
        .run(checkpoint="InternVL-U", dtype="fp32", device="cpu", memory="keep_loaded")
        .values[0]
    )
    assert again is model


def test_interrupt_stops_generation_and_the_next_run_works(model: Any) -> None:
    reference = _generate(model)
    request_interrupt()
    with pytest.raises(ProcessingInterrupted):
        _generate(model, steps=50)
    assert torch.equal(_generate(model), reference)


def test_interrupt_stops_text_generation(model: Any) -> None:
    reference = _understand(model)
    request_interrupt()
    with pytest.raises(ProcessingInterrupted):
        _understand(model)
    assert _understand(model) == reference


def test_unload_offload_and_free_ram(model: Any) -> None:
    reference = _generate(model)
    unload = SPECS["InternVLU_Unload"]
    result = unload.run(model=model, mode="offload", passthrough=reference)
    assert result.values[0] is reference and model.is_loaded
    unload.run(model=model, mode="free_ram")
    assert not model.is_loaded
    assert torch.equal(_generate(model), reference)  # reloaded from disk on demand
    assert model.is_loaded


def test_offload_after_run_mode(models_dir: Path) -> None:
    handle = (
        SPECS["InternVLU_Loader"]
        .run(checkpoint="InternVL-U", dtype="fp32", device="cpu", memory="offload_after_run")
        .values[0]
    )
    images = _generate(handle)
    assert images.shape == (1, 32, 32, 3) and handle.is_loaded
