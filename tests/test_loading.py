"""Loading the released layout: local folders, sharded weights, and clear errors for everything else."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_CHECKPOINT
from safetensors.torch import load_file, save_file

from internvl_u_core import InternVLUPipeline, InvalidInputError, ModelLoadError


@pytest.fixture
def checkpoint_copy(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(TINY_CHECKPOINT, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def _load(path, **kwargs):
    return InternVLUPipeline.from_pretrained(path, torch_dtype="float32", device="cpu", **kwargs)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load(tmp_path / "nope")


def test_missing_component_folder_is_named(checkpoint_copy):
    shutil.rmtree(checkpoint_copy / "vae")
    with pytest.raises(ModelLoadError, match="no 'vae/' folder"):
        _load(checkpoint_copy)


def test_missing_and_unexpected_keys_are_named(checkpoint_copy):
    weights = checkpoint_copy / "vlm" / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop("mlp1.1.bias")
    tensors["mlp1.9.weight"] = torch.zeros(2)
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError) as error:
        _load(checkpoint_copy)
    assert "missing parameters: mlp1.1.bias" in str(error.value)
    assert "unexpected parameters: mlp1.9.weight" in str(error.value)


def test_shape_mismatch_is_named(checkpoint_copy):
    weights = checkpoint_copy / "generation_decoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors["encoder_padding_token"] = torch.zeros(3)
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match="encoder_padding_token.*shape"):
        _load(checkpoint_copy)


def test_pickle_checkpoint_is_refused_without_loading(checkpoint_copy):
    weights = checkpoint_copy / "vlm" / "model.safetensors"
    marker = checkpoint_copy / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, checkpoint_copy / "vlm" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="pickle") as error:
        _load(checkpoint_copy)
    assert "safetensors" in str(error.value)
    assert not marker.exists()


def test_truncated_safetensors_names_the_file(checkpoint_copy):
    weights = checkpoint_copy / "generation_decoder" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _load(checkpoint_copy)


def test_corrupt_config_names_the_file(checkpoint_copy):
    (checkpoint_copy / "vlm" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        _load(checkpoint_copy)


def test_sharded_weights_load_identically(checkpoint_copy, tiny_pipe):
    folder = checkpoint_copy / "vlm"
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    pipe = _load(checkpoint_copy)
    for (name, a), b in zip(pipe.vlm.state_dict().items(), tiny_pipe.vlm.state_dict().values()):
        assert torch.equal(a, b), name
    assert pipe.understand(None, "Hello", max_new_tokens=4) == tiny_pipe.understand(None, "Hello", max_new_tokens=4)


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8", 3])
def test_bad_dtype_is_refused(dtype):
    with pytest.raises((InvalidInputError, TypeError), match="torch_dtype"):
        InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype=dtype, device="cpu")


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:0" if not torch.cuda.is_available() else "tpu"])
def test_bad_device_is_refused(device):
    with pytest.raises(InvalidInputError, match="device"):
        InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device=device)


def test_bfloat16_load_runs(tmp_path):
    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="bfloat16", device="cpu")
    assert pipe.dtype == torch.bfloat16
    assert isinstance(pipe.understand(None, "Hi", max_new_tokens=3), str)
    assert pipe.generate("a fox", width=32, height=32, steps=2, seed=0)[0].size == (32, 32)


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="offline"):
        _load("someone/not-a-real-internvlu")
