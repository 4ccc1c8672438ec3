"""The InternVL-U LoRA node: chaining, the untouched input branch, the folders it reads, refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import TINY_CHECKPOINT, get_pipeline  # noqa: E402
from lora_helpers import combined_adapter, dit_adapter  # noqa: E402

from nodes import all_specs  # noqa: E402
from nodes.lora_nodes import LoraModel  # noqa: E402

SPECS = {spec.node_id: spec for spec in all_specs()}
LORA = SPECS["InternVLU_LoRA"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """models/internvl_u with the tiny checkpoint, models/internvl_u_loras with two adapters and a foreign one."""
    root = tmp_path_factory.mktemp("models")
    models, loras = root / "internvl_u", root / "internvl_u_loras"
    models.mkdir()
    (loras / "styles").mkdir(parents=True)
    (models / "InternVL-U").symlink_to(TINY_CHECKPOINT, target_is_directory=True)
    pipe = get_pipeline("internvlu-tiny")
    a = dit_adapter(pipe, loras / "a.safetensors", seed=1)
    b = dit_adapter(pipe, loras / "styles" / "b.safetensors", seed=2)
    combined_adapter(pipe, loras / "ab.safetensors", a, b, scales=(0.6, 1.0))
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(loras / "sdxl_style.safetensors"))
    (root / "outside.safetensors").write_bytes(b"")
    patch = pytest.MonkeyPatch()
    patch.setenv("INTERNVLU_MODELS_DIR", str(models))
    patch.setenv("INTERNVLU_LORAS_DIR", str(loras))
    yield models, loras
    patch.undo()


@pytest.fixture(scope="module")
def model(folders) -> Any:
    return SPECS["InternVLU_Loader"].run(checkpoint="InternVL-U", dtype="fp32", device="cpu",
                                         memory="keep_loaded").values[0]


def _generate(model: Any) -> torch.Tensor:
    return SPECS["InternVLU_Generate"].run(
        model=model, prompt="a lighthouse at dusk", resolution="custom (width x height)", width=32, height=32,
        steps=2, all_cfg_scale=0.0, part_cfg_scale=0.0, seed=11, batch_size=1,
    ).values[0]


def test_the_node_lists_the_lora_folders(folders) -> None:
    assert LORA.input("lora_name").option_list() == ["a.safetensors", "ab.safetensors", "sdxl_style.safetensors",
                                                     "styles/b.safetensors"]


def test_the_input_branch_stays_the_base_model(model) -> None:
    base = _generate(model)
    adapted_model = LORA.run(model=model, lora_name="a.safetensors", strength=1.0).values[0]
    assert isinstance(adapted_model, LoraModel) and adapted_model.base is model
    adapted = _generate(adapted_model)
    assert not torch.equal(adapted, base)
    assert torch.equal(_generate(model), base), "the other branch must not see the adapter"
    assert torch.equal(_generate(adapted_model), adapted)


def test_strength_zero_is_the_base_image(model) -> None:
    base = _generate(model)
    assert torch.equal(_generate(LORA.run(model=model, lora_name="a.safetensors", strength=0.0).values[0]), base)


def test_two_chained_nodes_equal_the_combined_adapter(model) -> None:
    first = LORA.run(model=model, lora_name="a.safetensors", strength=0.6).values[0]
    chained = LORA.run(model=first, lora_name="styles/b.safetensors", strength=1.0).values[0]
    assert chained.loras[0][1] == 0.6 and len(chained.loras) == 2 and len(first.loras) == 1
    both = _generate(chained)
    combined = _generate(LORA.run(model=model, lora_name="ab.safetensors", strength=1.0).values[0])
    assert (both - combined).abs().max() <= 1 / 255 + 1e-6  # one level of rounding (another summation order)
    # The first node's output still holds only its own adapter.
    assert torch.equal(_generate(first), _generate(LORA.run(model=model, lora_name="a.safetensors",
                                                               strength=0.6).values[0]))


def test_foreign_and_outside_adapters_are_refused(model) -> None:
    base = _generate(model)
    from internvl_u_core import ModelLoadError

    with pytest.raises(ModelLoadError, match="not an InternVL-U LoRA"):
        LORA.run(model=model, lora_name="sdxl_style.safetensors", strength=1.0)
    with pytest.raises(FileNotFoundError, match="No LoRA named"):
        LORA.run(model=model, lora_name="../outside.safetensors", strength=1.0)
    with pytest.raises(TypeError, match="served model"):
        LORA.run(model=object(), lora_name="a.safetensors", strength=1.0)
    assert torch.equal(_generate(model), base)
