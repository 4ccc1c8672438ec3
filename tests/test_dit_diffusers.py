"""The DiT is a diffusers model: its machinery (config, save/load, attention backends, layerwise
casting, group offloading, cache hooks, regional compilation) works on it, on the CPU.

Every test runs the real DiT of the tiny fixture checkpoints on recorded fixture inputs and compares
with the plain model's output.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from safetensors.torch import load_file

from internvl_u_core.errors import InvalidInputError
from internvl_u_core.transformer import InternVLUGenerationDecoder, InternVLUTransformer2DModel

FIXTURES = Path(__file__).parent / "fixtures"


def _dit(fixture_set: str = "internvlu-tiny-c") -> InternVLUTransformer2DModel:
    folder = FIXTURES / fixture_set / "checkpoint" / "generation_decoder"
    model = InternVLUGenerationDecoder.from_config_dict(json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.decoder.eval()


def _inputs(fixture_set: str = "internvlu-tiny-c", case: str = "edit_batch2_pad") -> dict:
    """The conditioning arguments and latents of the first DiT call of a fixture case."""
    t = load_file(str(FIXTURES / fixture_set / "expected" / f"{case}.safetensors"))

    def tensor_list(name):
        found = sorted((k for k in t if k.startswith(f"decoder_step0.{name}.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        return [t[k] for k in found] or None

    return {
        "hidden_states": t["decoder_step0.hidden_states"],
        "encoder_hidden_states": t["decoder_step0.encoder_hidden_states"],
        "encoder_attention_mask": t["decoder_step0.encoder_attention_mask"],
        "encoder_image_token_mask": t["decoder_step0.encoder_image_token_mask"],
        "timestep": t["decoder_step0.timestep"],
        "image_grid_thw_gen": t["decoder_step0.image_grid_thw_gen"],
        "image_fhw_cond": tensor_list("image_fhw_cond"),
        "conditional_input": tensor_list("conditional_input"),
        "image_grid_thw_gen_cond": tensor_list("image_grid_thw_gen_cond"),
    }


def _steps(model, inputs: dict, timesteps=(0.9, 0.6, 0.3)) -> list[torch.Tensor]:
    """A short sampling loop with one context: the prediction of every step."""
    conditioning = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    latents, outputs = inputs["hidden_states"], []
    with torch.no_grad():
        context = model.prepare_context(**conditioning)
        for t in timesteps:
            prediction = model(latents, timestep=torch.full((latents.shape[0],), t), context=context)
            outputs.append(prediction)
            latents = latents - 0.3 * prediction
    return outputs


CASES = {"rows": ("internvlu-tiny-c", "edit_batch2_pad"), "equal": ("internvlu-tiny", "t2i_batch2_64x96")}


@pytest.fixture(scope="module")
def reference_steps():
    """The plain model's predictions, per fixture case, to compare every variant with."""
    return {name: _steps(_dit(s), _inputs(s, c)) for name, (s, c) in CASES.items()}


def test_is_a_diffusers_model_with_registered_config():
    model = _dit()
    assert isinstance(model, ModelMixin) and isinstance(model, ConfigMixin)
    assert model.config.num_layers == 2 and list(model.config.axes_dims_rope) == [4, 6, 6]
    assert model.config.vlm_cond_position_scale_factor == 0.25  # the wrapper's value wins
    assert model.config.timestep_scale == pytest.approx(0.001)
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path, reference_steps):
    _dit().save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = InternVLUTransformer2DModel.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(_dit().config)
    for a, b in zip(_steps(loaded, _inputs(*CASES["rows"])), reference_steps["rows"]):
        assert torch.equal(a, b)
    half = InternVLUTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_bad_config_is_a_load_error():
    with pytest.raises(OSError, match="axes_dims_rope"):
        InternVLUTransformer2DModel(attention_head_dim=16, axes_dims_rope=(4, 6, 8))


def test_context_and_conditioning_are_exclusive():
    model, inputs = _dit(), _inputs()
    conditioning = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    context = model.prepare_context(**conditioning)
    with pytest.raises(InvalidInputError, match="not both"):
        model(inputs["hidden_states"], timestep=inputs["timestep"], context=context, **{
            k: v for k, v in conditioning.items() if k == "encoder_hidden_states"})
    with pytest.raises(InvalidInputError, match="timestep"):
        model(inputs["hidden_states"], context=context)


@pytest.fixture
def restore_attention_backend():
    """diffusers' ``set_attention_backend`` also sets the process-wide default: put "native" back."""
    yield
    _dit().set_attention_backend("native")


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_backends(case, reference_steps, restore_attention_backend):
    model = _dit(CASES[case][0])
    model.set_attention_backend("native")
    assert all(str(m.processor._attention_backend.value) == "native" for m in model.modules() if hasattr(m, "processor"))
    for a, b in zip(_steps(model, _inputs(*CASES[case])), reference_steps[case]):
        assert torch.equal(a, b)  # the default backend is torch SDPA: the same call
    model.set_attention_backend("_native_math")
    for a, b in zip(_steps(model, _inputs(*CASES[case])), reference_steps[case]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must be one of"):
        model.set_attention_backend("no-such-backend")


def test_unavailable_attention_backend_is_refused(restore_attention_backend):
    model = _dit()
    with pytest.raises((RuntimeError, ImportError, ValueError)):
        model.set_attention_backend("xformers" if not _installed("xformers") else "sage")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_layerwise_casting_stores_bf16_and_computes_fp32(reference_steps):
    model = _dit()
    rounded = copy.deepcopy(model)
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert model.img_in.weight.dtype == torch.bfloat16
    # Skipped by the model's patterns (and diffusers' defaults): norms, RoPE, the output head.
    assert model.norm_out.linear.weight.dtype == torch.float32
    assert model.proj_out.weight.dtype == torch.float32
    assert model.dtype == torch.float32  # the compute dtype
    # The same model with exactly those weights rounded to bfloat16 gives the same numbers.
    skip = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(re.search(p, name) for p in skip):
                for param in module.parameters():
                    param.copy_(param.to(torch.bfloat16).float())
    inputs = _inputs()
    for a, b in zip(_steps(model, inputs), _steps(rounded, inputs)):
        assert torch.equal(a, b)
    for a, b in zip(_steps(model, inputs), reference_steps["rows"]):
        assert not torch.equal(a, b)
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_to_disk_gives_the_same_numbers(tmp_path, offload_type, reference_steps):
    model = _dit()
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    try:
        model.enable_group_offload(
            onload_device=torch.device("cpu"), offload_type=offload_type, offload_to_disk_path=str(tmp_path), **kwargs
        )
    except AttributeError as exc:
        # diffusers before 0.41 asks for the current accelerator when it builds the groups: None without one.
        if torch.accelerator.current_accelerator() is None and "'NoneType' object has no attribute 'type'" in str(exc):
            pytest.skip(f"diffusers {diffusers.__version__} needs an accelerator for group offloading")
        raise
    assert list(tmp_path.iterdir()), "weights were offloaded to disk"
    for a, b in zip(_steps(model, _inputs()), reference_steps["rows"]):
        assert torch.equal(a, b)


def test_first_block_cache_is_opt_in_and_resets_per_run(reference_steps):
    from diffusers.hooks import FirstBlockCacheConfig

    model = _dit()
    # Threshold 0: every step runs every block, so the numbers are exact.
    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    for a, b in zip(_steps(model, _inputs()), reference_steps["rows"]):
        assert torch.equal(a, b)
    model.disable_cache()
    # A huge threshold: the first step of each run is exact, later steps reuse the cached residual.
    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    for _ in range(2):  # a second run starts from a fresh cache (a new context)
        cached = _steps(model, _inputs())
        assert torch.equal(cached[0], reference_steps["rows"][0])
        assert not torch.equal(cached[1], reference_steps["rows"][1])
    model.disable_cache()
    assert not model.is_cache_enabled
    for a, b in zip(_steps(model, _inputs()), reference_steps["rows"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compile_repeated_blocks_traces_each_block_whole(case, reference_steps):
    torch._dynamo.reset()
    model = _dit(CASES[case][0])
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    for a, b in zip(_steps(model, _inputs(*CASES[case])), reference_steps[case]):
        assert torch.equal(a, b)
    torch._dynamo.reset()


def test_pipeline_compile_switch_keeps_the_images():
    """``pipe.compile_transformer`` is the user-facing switch; with it the images are the same."""
    import numpy as np
    from conftest import TINY_CHECKPOINT

    from internvl_u_core import InternVLUPipeline

    torch._dynamo.reset()
    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu")
    before = pipe.generate("a fox", width=32, height=32, steps=2, seed=3)[0]
    pipe.compile_transformer(backend="eager")
    after = pipe.generate("a fox", width=32, height=32, steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(before), np.asarray(after))
    torch._dynamo.reset()
    text_only = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu",
                                                  components=("vlm",))
    with pytest.raises(InvalidInputError, match="image components"):
        text_only.compile_transformer()
