"""The Loader and Unload nodes."""

from __future__ import annotations

from typing import Any

from .comfy_runtime import device_choices
from .common_inputs import model_input
from .model_handle import (
    DTYPES,
    KEEP_LOADED,
    NO_QUANTIZATION,
    InternVLUModel,
    LoadSettings,
    get_model,
    memory_modes,
    quantization_modes,
)
from .model_sources import model_choices, resolve_model
from .schema import (
    ANY_TYPE,
    MODEL_TYPE,
    NODE_ID_PREFIX,
    InputSpec,
    NodeResult,
    NodeSpec,
    OutputSpec,
)


def load_model(
    checkpoint: str, dtype: str, device: str, memory: str, allow_download: bool = False,
    quantization: str = NO_QUANTIZATION,
) -> NodeResult:
    """Resolve the checkpoint folder and load it (or reuse the copy loaded with equal settings)."""
    path = resolve_model(checkpoint, allow_download)
    handle = get_model(LoadSettings(str(path), dtype, device, memory, quantization))
    handle.pipeline()
    return NodeResult((handle,))


LOADER = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}Loader",
    display_name="InternVL-U Loader",
    description="Load an InternVL-U checkpoint from models/internvl_u/ (or, if allowed, the hub).",
    inputs=(
        InputSpec(
            "checkpoint",
            "COMBO",
            "Checkpoint folder under models/internvl_u/ (extra_model_paths.yaml key "
            "'internvl_u' adds folders), or a hub id that is downloaded there when "
            "'allow_download' is on.",
            options=model_choices,
        ),
        InputSpec(
            "dtype",
            "COMBO",
            "Weight precision. auto: fp32 on CPU, bf16 on GPUs that support it, else fp16.",
            options=DTYPES,
            default="auto",
        ),
        InputSpec(
            "device",
            "COMBO",
            "Where the model runs. auto: ComfyUI's device (the CPU under --cpu).",
            options=device_choices,
            default="auto",
        ),
        InputSpec(
            "memory",
            "COMBO",
            "keep_loaded: stay on the device until ComfyUI needs the memory or you unload models. "
            "offload_after_run: move to RAM after every run. The offload modes keep the weights in RAM "
            "and need a GPU: cpu_offload moves each part (VLM, DiT, VAE) to it while it runs; "
            "group_offload streams the ViT, LLM and DiT blocks one at a time (less VRAM); "
            "sequential_offload moves every layer for its own call (least VRAM, slowest).",
            options=memory_modes,
            default=KEEP_LOADED,
        ),
        InputSpec(
            "allow_download",
            "BOOLEAN",
            "Allow downloading a hub checkpoint into models/internvl_u/. Off: local files only.",
            default=False,
        ),
        InputSpec(
            "quantization",
            "COMBO",
            "Smaller weights for the LLM and the DiT (the ViT and the VAE stay in 'dtype'). none: full "
            "precision. int8: half of bf16's memory (GPU: torchao; CPU: several times faster decoding). "
            "fp8: like int8, for GPUs of compute capability 8.9+. nf4: a quarter of bf16's memory "
            "(bitsandbytes, GPU only). bf16: bfloat16 weights, worth it on the CPU.",
            options=quantization_modes,
            default=NO_QUANTIZATION,
        ),
    ),
    outputs=(OutputSpec("model", MODEL_TYPE, "The loaded InternVL-U model."),),
    run=load_model,
)


FREE_MODES = ("offload", "free_ram")


def unload_model(model: InternVLUModel, mode: str, passthrough: Any = None) -> NodeResult:
    """Offload the model from the accelerator, or free its weights entirely."""
    if mode == "free_ram":
        model.release()
    else:
        model.offload()
    return NodeResult((passthrough,), text=f"InternVL-U model {mode.replace('_', ' ')} done")


UNLOAD = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}Unload",
    display_name="InternVL-U Unload",
    description="Free memory used by an InternVL-U model. Connect 'passthrough' to run it after a given node.",
    inputs=(
        model_input(),
        InputSpec(
            "mode",
            "COMBO",
            "offload: move the weights to RAM, freeing VRAM. free_ram: drop the weights; the next "
            "run loads them again from disk.",
            options=FREE_MODES,
            default=FREE_MODES[0],
        ),
        InputSpec(
            "passthrough",
            ANY_TYPE,
            "Any value; unloading waits for it and it is passed on unchanged.",
            optional=True,
        ),
    ),
    outputs=(OutputSpec("output", ANY_TYPE, "The 'passthrough' input, unchanged."),),
    run=unload_model,
    output_node=True,
)
