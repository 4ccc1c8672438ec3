"""Loading: checking the load options, building the components on the meta device, reading their weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import offload as offloading
from . import quantization as quantizing
from . import validation as check
from .errors import InvalidInputError, ModelLoadError
from .loading import component_folder, import_model_libraries, load_weights_into, read_json, resolve_checkpoint
from .processor import InternVLUProcessor
from .sampling import use_reference_norms
from .vlm import InternVLUChatModel, VLMConfig

if TYPE_CHECKING:
    from .pipeline import InternVLUPipeline

logger = logging.getLogger("internvl_u_core")


def check_load_options(
    device=None, torch_dtype="auto", quantization=None, offload=None, names: check.ArgumentNames = check.API_NAMES
) -> tuple[torch.device, torch.dtype, quantizing.QuantizationPlan | None, str | None]:
    """Check ``from_pretrained``'s device, dtype, quantisation and offload choices without loading anything.

    Returns ``(device, dtype, quantisation plan or None, offload mode or None)``; the device is the one
    the model runs on (the GPU under offloading). Surfaces call it to refuse bad choices up front,
    in their own option names (``names``).
    """
    offload_mode = offloading.check_mode(offload, names)
    if offload_mode is None:
        device = check.device(device, names)
    else:
        device = offloading.check_device(offload_mode, device, names)
    dtype = check.dtype(torch_dtype, device)
    plan = quantizing.make_plan(quantizing.check_mode(quantization, device, names), device, dtype)
    _check_offload_with(plan, offload_mode)
    return device, dtype, plan, offload_mode


def _check_offload_with(plan: quantizing.QuantizationPlan | None, offload_mode: str | None) -> None:
    """Library-quantised weights move whole only: diffusers' group hooks do not handle them yet."""
    if plan is not None and plan.uses_library_quantizer and offload_mode not in (None, "model"):
        raise InvalidInputError(
            f"offload={offload_mode!r} cannot move {plan.backend}-quantised weights block by block yet "
            "(diffusers issues #13281, #14433); use offload='model' with quantization, or no quantization"
        )


def _build_on_meta(factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def load_generation_decoder(
    folder: Path, dtype: torch.dtype, device: torch.device, plan: quantizing.QuantizationPlan | None = None
):
    """The generation decoder, built on the meta device; a plan that quantises on load does it here."""
    from .transformer import InternVLUGenerationDecoder

    config = read_json(folder / "config.json")
    try:
        decoder = _build_on_meta(lambda: InternVLUGenerationDecoder.from_config_dict(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not a valid generation-decoder config: {exc}") from exc
    load_weights_into(decoder, folder, dtype=dtype, device=device,
                      replace=quantizing.generation_decoder_on_load(decoder, plan))
    return decoder.eval()


def load_vae(folder: Path, dtype: torch.dtype, device: torch.device):
    """The Qwen-Image VAE, built on the meta device and loaded like the other components."""
    from diffusers import AutoencoderKLQwenImage

    config = read_json(folder / "config.json")
    try:
        vae = _build_on_meta(lambda: AutoencoderKLQwenImage.from_config(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not a valid AutoencoderKLQwenImage config: {exc}") from exc
    load_weights_into(vae, folder, dtype=dtype, device=device)
    use_reference_norms(vae)
    return vae.eval()


def load_scheduler(folder: Path):
    from diffusers import DPMSolverMultistepScheduler

    config = read_json(folder / "scheduler_config.json")
    if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
        raise ModelLoadError(
            f"{folder / 'scheduler_config.json'} must set use_flow_sigmas=true and prediction_type='flow_prediction'"
        )
    return DPMSolverMultistepScheduler.from_config(config)


class PipelineLoading:
    """``from_pretrained``: the released checkpoint layout, weights straight from safetensors."""

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        torch_dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        progress: Callable[[str], None] | None = None,
        components: tuple[str, ...] = ("vlm", "generation_decoder", "vae"),
        quantization: str | None = None,
        offload: str | None = None,
    ) -> InternVLUPipeline:
        """Load a checkpoint folder (or hub id) in the released layout, weights straight from safetensors.

        ``quantization`` (one of ``quantization.MODES``: int8, fp8, nf4, bf16) shrinks the LLM and the
        DiT; ``offload`` (one of ``offload.MODES``: model, group, sequential) keeps weights in CPU
        memory and moves them to ``device`` (a GPU) while they run. Both are checked before any
        weight is read.
        """
        device, dtype, plan, offload_mode = check_load_options(device, torch_dtype, quantization, offload)
        # Full-precision parts load where they stay (the CPU under offloading); the quantised ones
        # on the CPU first when a library quantises them on the way to the device.
        home = torch.device("cpu") if offload_mode is not None else device
        quantized_home = torch.device("cpu") if plan is not None and plan.uses_library_quantizer else home
        say = progress or (lambda message: logger.info(message))
        import_model_libraries()
        root = resolve_checkpoint(path_or_id, local_files_only=local_files_only, revision=revision, progress=say)
        if not (root / "model_index.json").is_file():
            raise ModelLoadError(f"{root} has no model_index.json; is it an InternVL-U checkpoint folder?")
        say("Loading processor")
        vlm_folder = component_folder(root, "vlm")
        vlm_config = VLMConfig.from_dict(read_json(vlm_folder / "config.json"), str(vlm_folder / "config.json"))
        processor = InternVLUProcessor.from_folder(component_folder(root, "processor"), template=vlm_config.template)
        if processor.image_seq_length != vlm_config.num_image_token:
            raise ModelLoadError(
                f"processor image_seq_length {processor.image_seq_length} does not match the VLM's "
                f"{vlm_config.num_image_token} tokens per image"
            )
        say("Loading VLM")
        vlm = _build_on_meta(lambda: InternVLUChatModel(vlm_config, str(vlm_folder / "config.json")))
        if plan is not None and plan.quantizes_on_load:
            say(f"Quantising the LLM: {plan.describe()}, each layer as it loads")
        load_weights_into(
            vlm, vlm_folder, dtype=dtype, device=quantized_home, optional=vlm.tied_weight_names,
            dtype_overrides={"language_model.": plan.dtype} if plan is not None else None,
            replace=quantizing.language_model_on_load(vlm, plan),
            tied=dict.fromkeys(vlm.tied_weight_names, "language_model.model.embed_tokens.weight"),
        )
        if vlm.config.tie_word_embeddings and type(vlm.language_model.lm_head) is torch.nn.Linear:
            vlm.language_model.tie_weights()  # a head quantised on load was read from the embedding
        vlm.eval()
        if plan is not None and not plan.quantizes_on_load:
            say(f"Quantising the LLM: {plan.describe()}")
            quantizing.quantize_language_model(vlm, plan)
        decoder = vae = scheduler = None
        if "generation_decoder" in components:
            say("Loading generation decoder")
            folder = component_folder(root, "generation_decoder")
            if plan is None:
                decoder = load_generation_decoder(folder, dtype, home)
            elif plan.quantizes_on_load:
                say(f"Quantising the DiT: {plan.describe()}, each layer as it loads")
                decoder = load_generation_decoder(folder, plan.dtype, quantized_home, plan)
            else:
                decoder = load_generation_decoder(folder, plan.dtype, quantized_home)
                say(f"Quantising the DiT: {plan.describe()}")
                quantizing.quantize_generation_decoder(decoder, plan)
            say("Loading VAE")
            vae = load_vae(component_folder(root, "vae"), dtype, home)
            scheduler = load_scheduler(component_folder(root, "scheduler"))
        pipe = cls(vlm, decoder, vae, scheduler, processor, root, quantization=plan)
        if offload_mode is not None:
            pipe.enable_offload(offload_mode, device)
        say("Model ready")
        return pipe
