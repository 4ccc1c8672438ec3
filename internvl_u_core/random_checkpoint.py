"""Write random-weight checkpoints in the released layout (benchmarks and tests; no download needed).

The widths default to the released model's; layer counts, vocabulary and config flags can be changed
to exercise other variants the loader supports.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

RELEASED_VISION = {
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
    "num_attention_heads": 16, "intermediate_size": 4096, "num_hidden_layers": 24, "patch_size": 14,
    "image_size": 448, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6, "hidden_act": "gelu", "use_flash_attn": False, "num_channels": 3,
}
RELEASED_LLM = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "vocab_size": 151936, "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
}
RELEASED_DECODER = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 12, "joint_attention_dim": 4096, "axes_dims_rope": [16, 56, 56],
}
RELEASED_VAE = {
    "_class_name": "AutoencoderKLQwenImage", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                     0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                    1.5579, 1.6382, 1.1253, 2.8251, 1.916],
}


def _randomise(module: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Normal weights, zero biases, unit norm scales: finite, well-scaled activations at any depth."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                param.zero_()
            elif "norm" in name and param.ndim == 1:
                param.fill_(1.0)
            elif leaf in ("ls1", "ls2"):
                param.fill_(0.1)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _save_module(
    module: torch.nn.Module, folder: Path, file: str, config: dict, skip: tuple[str, ...] = (),
    dtype: torch.dtype = torch.float32,
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in module.state_dict().items()
        if k not in skip
    }
    save_file(state, str(folder / file))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_random_checkpoint(
    out_dir: str | Path,
    *,
    processor_source: str | Path,
    vit_layers: int = 4,
    llm_layers: int = 4,
    dit_layers: int = 4,
    vision: dict | None = None,
    llm: dict | None = None,
    decoder: dict | None = None,
    vae: dict | None = None,
    generation: dict | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Create ``out_dir`` with random weights stored as ``dtype``; ``processor_source`` gives tokenizer + processor config."""
    from diffusers import AutoencoderKLQwenImage

    from .transformer import InternVLUGenerationDecoder
    from .vlm import InternVLUChatModel, VLMConfig

    out = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    vision_cfg = {**RELEASED_VISION, **(vision or {}), "num_hidden_layers": vit_layers}
    llm_cfg = {**RELEASED_LLM, **(llm or {}), "num_hidden_layers": llm_layers}
    vlm_cfg = {
        "architectures": ["InternVLUChatModel"], "model_type": "internvlu_chat", "vision_config": vision_cfg,
        "llm_config": llm_cfg, "select_layer": -1, "downsample_ratio": 0.5, "template": "qwen2_5-chat-v3",
        "ps_version": "v2", "force_image_size": vision_cfg["image_size"],
        "tie_word_embeddings": llm_cfg.get("tie_word_embeddings", False),
    }
    vlm = InternVLUChatModel(VLMConfig.from_dict(copy.deepcopy(vlm_cfg), "random"))
    _randomise(vlm, generator)
    skip = ("language_model.lm_head.weight",) if vlm_cfg["tie_word_embeddings"] else ()
    _save_module(vlm, out / "vlm", "model.safetensors", vlm_cfg, skip, dtype)
    del vlm

    llm_width = llm_cfg["hidden_size"]
    decoder_cfg = {**RELEASED_DECODER, **(decoder or {}), "num_layers": dit_layers}
    select = (generation or {}).get("vlm_select_layer", [-1, -2])
    gen_cfg = {
        "architectures": ["InternVLUGenerationDecoder"], "model_type": "internvlu_generation_decoder",
        "decoder_config": decoder_cfg, "vlm_select_layer": select, "input_hidden_size": llm_width * len(select),
        "output_hidden_size": decoder_cfg["joint_attention_dim"], "decoder_projector_type": "identity",
        "padding_encoder_hidden_states": True, "pad_to_fix_length": True, "max_sequence_length": 768,
        "gen_image_height": 512, "gen_image_width": 512, "video_position_scale_factor": 1.0,
        "vlm_cond_position_scale_factor": 0.25, "flow_shift": 3.0, **(generation or {}),
    }
    gen = InternVLUGenerationDecoder.from_config_dict(copy.deepcopy(gen_cfg))
    _randomise(gen, generator)
    _save_module(gen, out / "generation_decoder", "model.safetensors", gen_cfg, dtype=dtype)
    del gen

    vae_cfg = {**RELEASED_VAE, **(vae or {})}
    model = AutoencoderKLQwenImage(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
    _save_module(model, out / "vae", "diffusion_pytorch_model.safetensors", vae_cfg, dtype=dtype)
    del model

    source = Path(processor_source)
    shutil.copytree(source / "processor", out / "processor", dirs_exist_ok=True)
    shutil.copytree(source / "scheduler", out / "scheduler", dirs_exist_ok=True)
    processor_config = json.loads((out / "processor" / "processor_config.json").read_text())
    side = vision_cfg["image_size"]
    processor_config["image_processor_kwargs"]["size"] = {"height": side, "width": side}
    processor_config["image_seq_length"] = int((side // vision_cfg["patch_size"]) ** 2 // 4)
    gen_kwargs = processor_config["image_gen_processor_kwargs"]
    gen_kwargs.update({"min_dynamic_patch": 4096, "max_dynamic_patch": 16384})
    for path in list((out / "processor").iterdir()) + list((out / "scheduler").iterdir()):
        path.chmod(0o644)
    (out / "processor" / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    index = json.loads((source / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
