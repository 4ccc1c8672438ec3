"""Parity of the generation decoder (MMDiT) with the official reference, on the tiny fixtures.

Every fixture case that recorded a DiT call is replayed: ``decoder_probe`` (``in.*`` →
``out.sample``) and the first DiT call of each image case (``decoder_step0.*``).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from internvl_u_core.transformer import (
    DecoderContext,
    InternVLUGenerationDecoder,
    InternVLUTransformer2DModel,
)

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_SETS = ("internvlu-tiny", "internvlu-tiny-c")
ATOL = RTOL = 1e-4


def _expected_file(fixture_set: str, case: str) -> Path:
    return FIXTURES / fixture_set / "expected" / f"{case}.safetensors"


def _cases_json(fixture_set: str) -> dict:
    return json.loads((FIXTURES / fixture_set / "cases.json").read_text())


def _dit_cases() -> list[tuple[str, str, str]]:
    """(fixture set, case, tensor prefix) for every recorded DiT call."""
    found = []
    for fixture_set in FIXTURE_SETS:
        for case in _cases_json(fixture_set)["cases"]:
            path = _expected_file(fixture_set, case["name"])
            if not path.is_file():
                continue
            with safe_open(str(path), "pt") as f:
                keys = set(f.keys())
            if "out.sample" in keys:
                found.append((fixture_set, case["name"], "in."))
            elif "decoder_step0.output" in keys:
                found.append((fixture_set, case["name"], "decoder_step0."))
    return found


DIT_CASES = _dit_cases()
IMAGE_CASES = [c for c in DIT_CASES if c[2] == "decoder_step0."]


@cache
def _decoder(fixture_set: str) -> InternVLUGenerationDecoder:
    folder = FIXTURES / fixture_set / "checkpoint" / "generation_decoder"
    model = InternVLUGenerationDecoder.from_config_dict(json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


@cache
def _tensors(fixture_set: str, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(_expected_file(fixture_set, case)))


def _list_length(fixture_set: str, case: str, name: str) -> int | None:
    for entry in _cases_json(fixture_set)["cases"]:
        if entry["name"] == case:
            lengths = entry["expected"].get("list_lengths") or {}
            if f"{name}.len" in lengths:
                return int(lengths[f"{name}.len"])
            if name.startswith("in.") and name == "in.image_fhw_cond":
                return int(entry["inputs"]["image_fhw_cond_len"])
    return None


def _tensor_list(fixture_set: str, case: str, name: str) -> list[torch.Tensor] | None:
    tensors = _tensors(fixture_set, case)
    n = _list_length(fixture_set, case, name)
    if n is None:
        if f"{name}.0" not in tensors:
            return None
        n = 0
        while f"{name}.{n}" in tensors:
            n += 1
    return [tensors[f"{name}.{i}"] for i in range(n)]


def _dit_inputs(fixture_set: str, case: str, prefix: str) -> tuple[dict, torch.Tensor]:
    t = _tensors(fixture_set, case)
    inputs = {
        "hidden_states": t[f"{prefix}hidden_states"],
        "encoder_hidden_states": t[f"{prefix}encoder_hidden_states"],
        "encoder_attention_mask": t[f"{prefix}encoder_attention_mask"],
        "encoder_image_token_mask": t[f"{prefix}encoder_image_token_mask"],
        "timestep": t[f"{prefix}timestep"],
        "image_grid_thw_gen": t[f"{prefix}image_grid_thw_gen"],
        "image_fhw_cond": _tensor_list(fixture_set, case, f"{prefix}image_fhw_cond"),
        "conditional_input": _tensor_list(fixture_set, case, f"{prefix}conditional_input"),
        "image_grid_thw_gen_cond": _tensor_list(fixture_set, case, f"{prefix}image_grid_thw_gen_cond"),
    }
    expected = t["out.sample"] if prefix == "in." else t["decoder_step0.output"]
    return inputs, expected


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual - expected).abs()
    bad = err > ATOL + RTOL * expected.abs()
    assert not bad.any(), f"{int(bad.sum())} values off, max abs error {err.max().item():.3g}"


def _ids(cases):
    return [f"{s}/{c}" for s, c, _ in cases]


@pytest.mark.parametrize(("fixture_set", "case", "prefix"), DIT_CASES, ids=_ids(DIT_CASES))
def test_dit_call_matches_reference(fixture_set, case, prefix):
    decoder = _decoder(fixture_set).decoder
    inputs, expected = _dit_inputs(fixture_set, case, prefix)
    with torch.no_grad():
        out = decoder(**inputs)
    _assert_close(out, expected)
    # Observed reference float64 error is a few 1e-6; anything near the tolerance is a bug.
    assert (out - expected).abs().max().item() < 2e-5


def test_all_fixture_dit_calls_are_covered():
    names = {(s, c) for s, c, _ in DIT_CASES}
    assert ("internvlu-tiny", "decoder_probe") in names and ("internvlu-tiny-c", "decoder_probe") in names
    for case in ("edit_single_64", "cot_t2i_64"):
        assert ("internvlu-tiny", case) in names
    for case in ("edit_default_steps_64", "edit_image_slot_truncated", "edit_image_slot_mid",
                 "edit_batch2_pad", "t2i_truncated_span"):
        assert ("internvlu-tiny-c", case) in names


@pytest.mark.parametrize(("fixture_set", "case", "prefix"), IMAGE_CASES, ids=_ids(IMAGE_CASES))
def test_prepare_forward_input_matches_reference(fixture_set, case, prefix):
    model = _decoder(fixture_set)
    t = _tensors(fixture_set, case)
    states = _tensor_list(fixture_set, case, "cond.encoder_hidden_states")
    masks = _tensor_list(fixture_set, case, "cond.encoder_image_token_mask")
    assert states is not None and masks is not None and len(states) == len(masks)
    with torch.no_grad():
        hidden, mask, image_mask = model.prepare_forward_input(states, masks)
    assert mask.dtype == torch.bool and image_mask.dtype == torch.bool
    assert torch.equal(mask, t["decoder_step0.encoder_attention_mask"])
    assert torch.equal(image_mask, t["decoder_step0.encoder_image_token_mask"])
    assert torch.equal(hidden, t["decoder_step0.encoder_hidden_states"])


def test_truncation_keeps_first_tokens():
    model = _decoder("internvlu-tiny-c")  # pad_to_fix_length, max_sequence_length 64
    assert model.config.pad_to_fix_length and model.config.max_sequence_length == 64
    long = torch.randn(100, model.config.input_hidden_size)
    short = torch.randn(5, model.config.input_hidden_size)
    img = torch.zeros(100, dtype=torch.bool)
    img[60:70] = True
    with torch.no_grad():
        hidden, mask, image_mask = model.prepare_forward_input([long, short], [img, torch.zeros(5, dtype=torch.bool)])
    assert hidden.shape == (2, 64, model.config.input_hidden_size)
    assert torch.equal(hidden[0], long[:64]) and torch.equal(hidden[1, :5], short)
    assert torch.equal(hidden[1, 5:], model.encoder_padding_token.detach().expand(59, -1))
    assert mask.sum(1).tolist() == [64, 5]
    assert image_mask[0].nonzero().flatten().tolist() == list(range(60, 64))


@pytest.mark.parametrize(
    ("fixture_set", "case"),
    [("internvlu-tiny", "edit_single_64"), ("internvlu-tiny-c", "edit_batch2_pad"), ("internvlu-tiny", "t2i_batch2_64x96")],
)
def test_context_reuse_equals_forward(fixture_set, case):
    decoder = _decoder(fixture_set).decoder
    inputs, _ = _dit_inputs(fixture_set, case, "decoder_step0.")
    ctx_args = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        context = decoder.prepare_context(**ctx_args)
        assert isinstance(context, DecoderContext)
        for step in range(3):  # the same context serves every step
            latents = torch.randn(inputs["hidden_states"].shape, generator=gen)
            timestep = inputs["timestep"] * (1 - 0.3 * step)
            expected = decoder(**{**inputs, "hidden_states": latents, "timestep": timestep})
            assert torch.equal(decoder.forward_with_context(latents, timestep, context), expected)


def test_rows_are_independent_and_timesteps_per_row():
    """Each row only sees its own tokens; per-row timesteps take the gather path."""
    decoder = _decoder("internvlu-tiny-c").decoder
    inputs, _ = _dit_inputs("internvlu-tiny-c", "edit_batch2_pad", "decoder_step0.")
    batch = inputs["hidden_states"].shape[0]
    timestep = torch.linspace(0.2, 0.9, batch)
    with torch.no_grad():
        together = decoder(**{**inputs, "timestep": timestep})
        for b in range(batch):
            single = decoder(
                hidden_states=inputs["hidden_states"][b : b + 1],
                encoder_hidden_states=inputs["encoder_hidden_states"][b : b + 1],
                encoder_attention_mask=inputs["encoder_attention_mask"][b : b + 1],
                encoder_image_token_mask=inputs["encoder_image_token_mask"][b : b + 1],
                timestep=timestep[b : b + 1],
                image_grid_thw_gen=inputs["image_grid_thw_gen"][b : b + 1],
                image_fhw_cond=inputs["image_fhw_cond"][b : b + 1],
                conditional_input=inputs["conditional_input"][b : b + 1],
                image_grid_thw_gen_cond=inputs["image_grid_thw_gen_cond"][b : b + 1],
            )
            torch.testing.assert_close(together[b : b + 1], single, atol=1e-5, rtol=1e-5)


def test_output_is_zero_outside_each_rows_grid():
    decoder = _decoder("internvlu-tiny").decoder
    inputs, _ = _dit_inputs("internvlu-tiny", "decoder_probe", "in.")
    grid = inputs["image_grid_thw_gen"].clone()
    grid[1] = torch.tensor([1, 4, 6])
    with torch.no_grad():
        out = decoder(**{**inputs, "image_grid_thw_gen": grid})
    assert out[1, :, 4:].abs().sum() == 0 and out[1, :, :, 6:].abs().sum() == 0
    assert out[1, :, :4, :6].abs().sum() > 0


@pytest.mark.parametrize("fixture_set", FIXTURE_SETS)
def test_builds_on_meta_device(fixture_set):
    folder = FIXTURES / fixture_set / "checkpoint" / "generation_decoder"
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = InternVLUGenerationDecoder.from_config_dict(config)
    assert all(p.is_meta for p in model.parameters())
    assert not list(model.buffers())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    # Loading by assignment on top of the meta module gives a working model.
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True, assign=True)
    inputs, expected = _dit_inputs(fixture_set, "decoder_probe", "in.")
    with torch.no_grad():
        _assert_close(model.decoder(**inputs), expected)


def test_config_fields():
    model = _decoder("internvlu-tiny-c")
    cfg = model.config
    assert cfg.vlm_select_layer == [-1, -2]
    assert cfg.max_sequence_length == 64 and cfg.pad_to_fix_length
    assert (cfg.gen_image_height, cfg.gen_image_width) == (64, 64)
    assert cfg.input_hidden_size == 128 and cfg.decoder_projector_type == "identity"
    assert cfg.vlm_cond_position_scale_factor == 0.25 and cfg.video_position_scale_factor == 1.0
    dit = model.decoder
    assert dit.config.timestep_scale == pytest.approx(0.001)
    assert (dit.config.patch_size, dit.config.in_channels, dit.config.out_channels, dit.latent_channels) == (2, 16, 4, 4)
    assert dit.config.vlm_cond_position_scale_factor == 0.25
    assert _decoder("internvlu-tiny").decoder.config.timestep_scale == 1.0


def test_outer_scale_factors_overwrite_decoder_config():
    folder = FIXTURES / "internvlu-tiny" / "checkpoint" / "generation_decoder"
    config = json.loads((folder / "config.json").read_text())
    config["vlm_cond_position_scale_factor"] = 0.5
    config["decoder_config"] = {**config["decoder_config"], "vlm_cond_position_scale_factor": 2.0}
    with torch.device("meta"):
        model = InternVLUGenerationDecoder.from_config_dict(config)
    assert model.decoder.config.vlm_cond_position_scale_factor == 0.5


def test_mlp_projector_parameter_names():
    folder = FIXTURES / "internvlu-tiny" / "checkpoint" / "generation_decoder"
    config = json.loads((folder / "config.json").read_text())
    config.update(decoder_projector_type="mlp2x_gelu", input_hidden_size=96, output_hidden_size=128)
    with torch.device("meta"):
        model = InternVLUGenerationDecoder.from_config_dict(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("decoder_projector")}
    assert shapes == {
        "decoder_projector.0.weight": (384, 96),
        "decoder_projector.0.bias": (384,),
        "decoder_projector.2.weight": (128, 384),
        "decoder_projector.2.bias": (128,),
    }


def test_vit_block_positions_with_scale():
    """A complete ViT run gets the stretched grid at frame `cur`; text resumes after its maximum."""
    decoder = InternVLUTransformer2DModel.from_config(
        {"num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 1, "axes_dims_rope": [4, 6, 6],
         "in_channels": 16, "out_channels": 4, "joint_attention_dim": 8, "vlm_cond_position_scale_factor": 0.25}
    )
    mask = torch.tensor([[False] * 3 + [True] * 16 + [False] * 2 + [True] * 3 + [False]])  # 2nd run truncated
    n = mask.shape[1]
    with torch.no_grad():
        ctx = decoder.prepare_context(
            torch.zeros(1, n, 8), torch.ones(1, n, dtype=torch.bool), mask,
            torch.tensor([[1, 8, 8]]), [torch.tensor([[1, 4, 4], [1, 4, 4]])],
        )
    pos = ctx.positions[0]
    assert pos.shape == (16 + n, 3)
    text = pos[16:]
    # target 4×4 grid: y, x ∈ -2…1 → text starts at 2
    assert text[:3].tolist() == [[2, 2, 2], [3, 3, 3], [4, 4, 4]]
    block = text[3:19]
    assert block[:, 0].unique().tolist() == [5.0]
    assert block[:4, 2].tolist() == [-8.0, -3.0, 2.0, 7.0]
    assert block[::4, 1].tolist() == [-8.0, -3.0, 2.0, 7.0]
    # after the block: int(max(5, 7)) + 1 = 8; then the truncated run is numbered like text
    assert text[19:].tolist() == [[v, v, v] for v in (8.0, 9.0, 10.0, 11.0, 12.0, 13.0)]


def test_half_precision_runs():
    decoder = InternVLUTransformer2DModel.from_config(
        json.loads((FIXTURES / "internvlu-tiny" / "checkpoint" / "generation_decoder" / "config.json").read_text())[
            "decoder_config"
        ]
    )
    decoder.load_state_dict(
        {
            k.removeprefix("decoder."): v
            for k, v in load_file(
                str(FIXTURES / "internvlu-tiny" / "checkpoint" / "generation_decoder" / "model.safetensors")
            ).items()
            if k.startswith("decoder.")
        }
    )
    inputs, _ = _dit_inputs("internvlu-tiny", "edit_single_64", "decoder_step0.")
    # 999 rounds to 1000 in bf16 (the reference does the same); compare at a bf16-exact timestep.
    inputs = {**inputs, "timestep": torch.full_like(inputs["timestep"], 1000.0)}
    with torch.no_grad():
        expected = decoder(**inputs)
        decoder = decoder.to(torch.bfloat16)
        out = decoder(**inputs)
        assert decoder.time_text_embed.sinusoid(torch.tensor([999.0]), torch.bfloat16).dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    rel = (out.float() - expected).norm() / expected.norm()
    assert rel < 0.03, rel  # observed 0.005
