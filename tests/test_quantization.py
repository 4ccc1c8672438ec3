"""Quantisation modes on the tiny checkpoint: what runs on the CPU, what is refused, and the library wiring.

Closeness is stated in two numbers: the PSNR of the generated and edited images against the float32
pipeline's, and the cosine of the first answer token's logits (``pipe.next_token_logits``) over a
fixed set of questions. Random weights make the text drift larger than a trained model's would.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TINY_CHECKPOINT
from PIL import Image
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from internvl_u_core import InternVLUPipeline, InvalidInputError, quantization

FOX = Image.open(FIXTURES / "internvlu-tiny" / "inputs" / "img_fox_80x60.png").convert("RGB")
QUESTIONS = [("Describe the picture.", FOX), ("What is two plus two?", None), ("A poster for a jazz night", None)]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _jobs(pipe) -> dict:
    """The four jobs, deterministic, small."""
    return {
        "generate": pipe.generate("a red fox", width=64, height=64, steps=3, seed=0)[0],
        "edit": pipe.edit(FOX, "make it blue", steps=3, seed=0, width=64, height=64)[0],
        "understand": pipe.understand(FOX, "What is this?", max_new_tokens=6),
        "reason": pipe.reason("a fox in the snow", max_new_tokens=6).text,
    }


def _psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mse = float((diff**2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _logit_cosines(pipe, reference) -> list[float]:
    return [
        torch.nn.functional.cosine_similarity(
            pipe.next_token_logits(question, image), reference.next_token_logits(question, image), dim=0
        ).item()
        for question, image in QUESTIONS
    ]


@pytest.fixture(scope="module")
def float32_jobs(tiny_pipe):
    return _jobs(tiny_pipe)


@pytest.mark.parametrize(
    "mode,min_psnr,min_cosine",
    # Measured on this checkpoint: int8 51 dB and cosines >= 0.991; bf16 (the whole DiT computes in
    # bfloat16) 29 dB and cosines >= 0.9997.
    [("int8", 40.0, 0.98), ("bf16", 22.0, 0.999)],
)
def test_cpu_mode_runs_all_four_jobs_close_to_float32(tiny_pipe, float32_jobs, mode, min_psnr, min_cosine):
    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu", quantization=mode)
    assert pipe.quantization.mode == mode and pipe.dtype == torch.float32  # the ViT keeps torch_dtype
    jobs = _jobs(pipe)
    assert isinstance(jobs["understand"], str) and isinstance(jobs["reason"], str)
    for name in ("generate", "edit"):
        assert jobs[name].size == float32_jobs[name].size
        psnr = _psnr(jobs[name], float32_jobs[name])
        assert min_psnr <= psnr < float("inf"), f"{name}: {psnr:.1f} dB"  # close, not equal
    cosines = _logit_cosines(pipe, tiny_pipe)
    assert min(cosines) >= min_cosine and min(cosines) < 1.0, cosines
    assert pipe.model_size_bytes() < tiny_pipe.model_size_bytes()


def test_cpu_int8_uses_pytorch_dynamic_int8_on_the_llm_and_the_dit_blocks_only():
    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu", quantization="int8")
    assert pipe.quantization.backend == quantization.DYNAMIC_INT8
    llm, dit = pipe.vlm.language_model, pipe.generation_decoder.decoder
    assert isinstance(llm.lm_head, DynamicLinear)  # the largest matrix read per token
    assert not any(type(m) is nn.Linear for m in llm.modules())
    assert not any(type(m) is nn.Linear for m in dit.transformer_blocks.modules())
    for name in quantization.DIT_FULL_PRECISION:
        assert not any(isinstance(m, DynamicLinear) for m in dit.get_submodule(name).modules()), name
    # The ViT, its projector and the VAE stay in full precision.
    for part in (pipe.vlm.vision_model, pipe.vlm.mlp1, pipe.vae):
        assert not any(isinstance(m, DynamicLinear) for m in part.modules())


def test_cpu_int8_quantised_on_load_equals_quantising_the_loaded_float32_model(tiny_pipe):
    # Loading quantises each Linear a block of rows at a time; the result must be the very int8
    # weights and scales quantize_dynamic makes from the whole float32 model (same kernels after).
    on_load = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu", quantization="int8")
    after = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu")
    quantization.dynamic_int8(after.vlm.language_model)
    quantization.dynamic_int8(after.generation_decoder.decoder.transformer_blocks)
    pairs = [(a, b) for a, b in zip(on_load.vlm.modules(), after.vlm.modules())]
    pairs += [(a, b) for a, b in zip(on_load.generation_decoder.modules(), after.generation_decoder.modules())]
    linears = [(a, b) for a, b in pairs if isinstance(b, DynamicLinear)]
    assert len(linears) == sum(isinstance(m, DynamicLinear) for m in on_load.vlm.modules()) + sum(
        isinstance(m, DynamicLinear) for m in on_load.generation_decoder.modules())
    for a, b in linears:
        assert type(a) is DynamicLinear and (a.in_features, a.out_features) == (b.in_features, b.out_features)
        assert torch.equal(a.weight().int_repr(), b.weight().int_repr())
        assert torch.equal(a.weight().q_per_channel_scales(), b.weight().q_per_channel_scales())
        assert (a.bias() is None) == (b.bias() is None) and (a.bias() is None or torch.equal(a.bias(), b.bias()))
    # The tied embedding stays the float32 file tensor; the head is its int8 copy.
    embedding = on_load.vlm.language_model.model.embed_tokens.weight
    assert embedding.dtype == torch.float32 and torch.equal(embedding, tiny_pipe.vlm.language_model.model.embed_tokens.weight)
    question, image = QUESTIONS[0]
    assert torch.equal(on_load.next_token_logits(question, image), after.next_token_logits(question, image))


def test_bf16_keeps_the_vit_and_vae_in_torch_dtype():
    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu", quantization="bf16")
    assert {p.dtype for p in pipe.vlm.language_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.generation_decoder.parameters()} == {torch.bfloat16}
    for part in (pipe.vlm.vision_model, pipe.vlm.mlp1, pipe.vae):
        assert {p.dtype for p in part.parameters()} == {torch.float32}


@NO_CUDA
@pytest.mark.parametrize("mode,needs", [("nf4", "bitsandbytes"), ("fp8", "torchao")])
def test_cuda_modes_are_refused_before_any_weight_is_read(unreadable_weights, mode, needs):
    # Every weight file of this checkpoint is garbage: reading one would raise a ModelLoadError instead.
    with pytest.raises(InvalidInputError) as refused:
        InternVLUPipeline.from_pretrained(unreadable_weights, device="cpu", quantization=mode)
    message = str(refused.value)
    assert "\n" not in message
    assert f"quantization={mode!r}" in message and "CUDA" in message and needs in message
    assert "on the CPU use int8 or bf16" in message


def test_unknown_modes_and_types_are_refused_with_the_choices(unreadable_weights):
    with pytest.raises(InvalidInputError, match=r"quantization='int4' is not a quantisation mode; use one of int8, fp8, nf4, bf16"):
        InternVLUPipeline.from_pretrained(unreadable_weights, device="cpu", quantization="int4")
    with pytest.raises(TypeError, match="quantization must be a string"):
        InternVLUPipeline.from_pretrained(unreadable_weights, device="cpu", quantization=8)
    assert quantization.check_mode("none", torch.device("cpu")) is None
    assert quantization.check_mode(" INT8 ", torch.device("cpu")) == "int8"


# ----------------------------------------------------------------------------------------------
# The CUDA wiring, run on the CPU: torchao works there too (slowly), through the same library calls
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_torchao_path_goes_through_transformers_and_diffusers_quantisers(tiny_pipe, float32_jobs):
    from torchao.utils import TorchAOBaseTensor

    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu")
    plan = quantization.QuantizationPlan("int8", torch.device("cpu"), quantization.TORCHAO, torch.float32)
    quantization.quantize_language_model(pipe.vlm, plan)
    quantization.quantize_generation_decoder(pipe.generation_decoder, plan)
    llm, dit = pipe.vlm.language_model, pipe.generation_decoder.decoder
    assert llm.hf_quantizer.quantization_config.quant_method == "torchao"  # transformers' quantiser
    assert dit.hf_quantizer.quantization_config.quant_method == "torchao"  # diffusers' quantiser
    assert isinstance(llm.model.layers[0].mlp.up_proj.weight, TorchAOBaseTensor)
    assert not isinstance(llm.lm_head.weight, TorchAOBaseTensor)  # transformers keeps the tied head
    assert isinstance(dit.transformer_blocks[0].attn.to_q.weight, TorchAOBaseTensor)
    for name in quantization.DIT_FULL_PRECISION:
        assert not any(isinstance(p, TorchAOBaseTensor) for p in dit.get_submodule(name).parameters()), name
    image = pipe.generate("a red fox", width=64, height=64, steps=3, seed=0)[0]
    assert 35.0 <= _psnr(image, float32_jobs["generate"]) < float("inf")
    assert min(_logit_cosines(pipe, tiny_pipe)) >= 0.99
    assert pipe.model_size_bytes() < tiny_pipe.model_size_bytes()


def test_module_bytes_counts_packed_int8_weights():
    linear = nn.Linear(64, 32)
    assert quantization.module_bytes(linear) == (64 * 32 + 32) * 4
    quantized = nn.Sequential(nn.Linear(64, 32))
    quantization.dynamic_int8(quantized)
    # int8 weights, one float64 scale and one int64 zero point per output row, float32 bias.
    assert quantization.module_bytes(quantized) == 64 * 32 + 32 * (8 + 8) + 32 * 4
