"""Checkpoints our own code writes with other sizes and config flags load and run every job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CHECKPOINT, load_inputs

from internvl_u_core import InternVLUPipeline
from internvl_u_core.random_checkpoint import write_random_checkpoint

SMALL_VISION = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 56}
SMALL_LLM = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "vocab_size": 420, "max_position_embeddings": 2048}
SMALL_DECODER = {"attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 128, "in_channels": 16,
                 "out_channels": 4, "axes_dims_rope": [4, 6, 6]}
SMALL_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
             "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 2.0, 1.2, 1.8]}

VARIANTS = {
    "rmsnorm-qknorm-vit-tied-qwen3": {
        "vision": {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False},
        "llm": {"tie_word_embeddings": True},
    },
    "qwen2-llm-mlp-projector": {
        "llm": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": False},
        "generation": {"decoder_projector_type": "mlp2x_gelu", "output_hidden_size": 96,
                       "vlm_select_layer": [-1], "pad_to_fix_length": False, "max_sequence_length": 16},
        "decoder": {"joint_attention_dim": 96},
    },
    "llama-llm-last-layer-features": {
        "llm": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False},
        "generation": {"vlm_select_layer": [-2, -1], "vlm_cond_position_scale_factor": 0.5,
                       "video_position_scale_factor": 0.5, "max_sequence_length": 24, "timestep_scale": 0.001},
    },
    "qwen3-moe-llm": {
        "llm": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 4,
                "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                "tie_word_embeddings": False},
    },
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_pipe(request, tmp_path_factory):
    spec = VARIANTS[request.param]
    generation = dict(spec.get("generation", {}))
    decoder = {**SMALL_DECODER, **spec.get("decoder", {})}
    if "timestep_scale" in generation:
        decoder["timestep_scale"] = generation.pop("timestep_scale")
    generation.setdefault("gen_image_height", 32)
    generation.setdefault("gen_image_width", 32)
    folder = write_random_checkpoint(
        tmp_path_factory.mktemp(request.param) / "ckpt", processor_source=TINY_CHECKPOINT,
        vit_layers=2, llm_layers=2, dit_layers=2,
        vision={**SMALL_VISION, **spec.get("vision", {})}, llm={**SMALL_LLM, **spec.get("llm", {})},
        decoder=decoder, vae=SMALL_VAE, generation=generation, seed=1,
    )
    return InternVLUPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


def test_variant_runs_every_job(variant_pipe):
    fox = load_inputs("internvlu-tiny", "img_fox_80x60.png")
    assert isinstance(variant_pipe.understand([fox, fox], "compare", max_new_tokens=3), str)
    reasoning = variant_pipe.reason("a tree", max_new_tokens=3)
    first = variant_pipe.generate("a tree", steps=2, seed=0, reasoning=reasoning)
    again = variant_pipe.generate("a tree", steps=2, seed=0, reasoning=reasoning)
    assert first[0].size == (32, 32) and np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    edited = variant_pipe.edit(fox, "make it red", steps=2, seed=0, width=40, height=24)
    assert edited[0].size == (40, 24)
    assert np.asarray(edited[0]).std() > 0


def test_bfloat16_matches_float32_closely(variant_pipe, tmp_path):
    folder = variant_pipe.root
    low = InternVLUPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, device="cpu")
    a = np.asarray(variant_pipe.generate("a tree", steps=2, seed=0, width=32, height=32)[0], dtype=np.int16)
    b = np.asarray(low.generate("a tree", steps=2, seed=0, width=32, height=32)[0], dtype=np.int16)
    assert np.abs(a - b).mean() < 12  # bf16 rounding, not a different model
