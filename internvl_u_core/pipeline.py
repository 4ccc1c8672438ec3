"""``InternVLUPipeline``: load the released checkpoint layout and run the four jobs.

Data flows one way: processor → VLM → conditioning → diffusion transformer → VAE. The class is put
together from one part per concern, each in its own module:

* ``pipeline_types``: the values that travel through it (requests, settings, conditioning, reasonings);
* ``pipeline_loading``: ``from_pretrained`` and checking the load options (``check_load_options``);
* ``pipeline_devices``: devices, offloading, tiling, compiling, sizes;
* ``pipeline_text``: ``understand``, ``understand_each``, ``reason``, ``next_token_logits``;
* ``pipeline_images``: ``generate``, ``edit`` and the denoising loop;
* ``pipeline_batching``: ``generate_batch`` and ``check_request`` (servers);
* ``pipeline_latents``: latents ↔ pictures (``decode_latents``, ``to_vae_latents`` ...);
* ``pipeline_adapters``: LoRA adapters (``load_lora``, ``set_loras``, ``remove_lora``; the work is in ``lora``).

Every name importable from this module before the split still is.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

from . import lora as adapters
from . import offload as offloading
from . import quantization as quantizing
from . import validation as check
from .limits import DEFAULT_LIMITS, DEFAULT_REASONING_TOKENS, DEFAULT_STEPS
from .pipeline_adapters import LoraAdapters
from .pipeline_batching import BatchedImages, _merge_conditions, _seeded_or_random  # noqa: F401 (importable here as before)
from .pipeline_devices import PipelineDevices
from .pipeline_images import ImageJobs, _unique_text_rows  # noqa: F401 (importable here as before)
from .pipeline_latents import LatentCodecs
from .pipeline_loading import (  # noqa: F401 (the private helpers: importable here as before)
    PipelineLoading,
    _build_on_meta,
    _check_offload_with,
    check_load_options,
    load_generation_decoder,
    load_scheduler,
    load_vae,
)
from .pipeline_text import TextJobs
from .pipeline_types import (
    DIFFUSION_KWARGS,
    TEXT_KWARGS,
    Conditioning,
    DiffusionSettings,
    ImageRequest,
    InternVLUPipelineOutput,
    Reasoning,
    _split_kwargs,
    check_reasoning,
)
from .processor import IM_END, IM_START, IMG_CONTEXT, IMG_START, InternVLUProcessor
from .sampling import LatentCodec, StepCallback
from .textgen import TokenCallback
from .tracing import TraceSink
from .vlm import SPECIAL_TOKENS, InternVLUChatModel

logger = logging.getLogger("internvl_u_core")

__all__ = [
    "DIFFUSION_KWARGS",
    "TEXT_KWARGS",
    "Conditioning",
    "DiffusionSettings",
    "ImageRequest",
    "InternVLUPipeline",
    "InternVLUPipelineOutput",
    "Reasoning",
    "check_load_options",
    "check_reasoning",
    "load_generation_decoder",
    "load_scheduler",
    "load_vae",
]


class InternVLUPipeline(
    PipelineLoading, PipelineDevices, TextJobs, ImageJobs, BatchedImages, LatentCodecs, LoraAdapters
):
    """The whole InternVL-U model: understanding, reasoning, text-to-image and editing."""

    def __init__(
        self, vlm, generation_decoder, vae, scheduler, processor: InternVLUProcessor, root: Path | None = None,
        quantization: quantizing.QuantizationPlan | None = None,
    ):
        self.vlm: InternVLUChatModel = vlm
        self.generation_decoder = generation_decoder
        self.vae = vae
        self.scheduler = scheduler
        self.processor = processor
        self.root = root
        self.codec = LatentCodec(vae) if vae is not None else None
        self._lock = threading.RLock()
        self._admission_lock = threading.Lock()
        self._admission_processor: InternVLUProcessor | None = None  # check_request's own tokenizer
        #: How the LLM and the DiT are quantised (None: full precision); see ``internvl_u_core.quantization``.
        self.quantization = quantization
        self._offload: offloading.Offloader | None = None
        # Skip work whose result the reference throws away (benchmarks switch it off to compare).
        self.dedupe_guidance_rows = True
        self.limits = replace(DEFAULT_LIMITS)
        # Tests set this to a callable(name, tensor) to compare every stage with the reference (see tracing).
        self.recorder: TraceSink | None = None
        #: LoRA adapters loaded into the DiT/LLM and which are on (see :meth:`load_lora`).
        self.loras = adapters.AdapterSet(self)
        tok = processor.token_id
        self.im_start_id = tok(IM_START)
        self.im_end_id = tok(IM_END)
        self.img_id = tok(IMG_START)
        self.image_context_id = tok(IMG_CONTEXT)
        self.eos_id = processor.tokenizer.eos_token_id if processor.tokenizer.eos_token_id is not None else self.im_end_id
        vocab = processor.tokenizer.get_vocab()
        vlm.set_special_token_ids([vocab.get(t, -1) for t in SPECIAL_TOKENS], self.image_context_id)

    # ------------------------------------------------------------------------------------------
    # Reference-compatible call
    # ------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        generation_mode: str = "text",
        system_prompt: str | None = None,
        callback: StepCallback | None = None,
        token_callback: TokenCallback | None = None,
        **kwargs,
    ) -> InternVLUPipelineOutput:
        """Same arguments and nesting as the official pipeline; one import changes, nothing else."""
        mode = check.generation_mode(generation_mode)
        prompts, images = check.prompts_and_images(prompt, image, limits=self.limits)
        system_prompt = check.system_prompt(system_prompt, self.limits)
        text_kwargs, diffusion_kwargs = _split_kwargs(kwargs, mode)
        with self._lock:
            if mode == "text":
                text_kwargs = check.text_kwargs(text_kwargs, default_max_new_tokens=None, limits=self.limits)
                ids = self._generate_text(prompts, images, "text", system_prompt, text_kwargs, None, token_callback)
                return InternVLUPipelineOutput(generate_output=ids, text=self._decode(ids))
            self._require_generation()
            given = {key: value for key, value in diffusion_kwargs.items() if value is not None}
            settings = self._diffusion_settings(
                mode,
                height=given.get("height"),
                width=given.get("width"),
                steps=given.get("num_inference_steps", DEFAULT_STEPS),
                images_per_prompt=given.get("num_images_per_prompt", 1),
                all_cfg_scale=given.get("all_cfg_scale"),
                part_cfg_scale=given.get("part_cfg_scale"),
                generator=given.get("generator"),
                names=check.REFERENCE_NAMES,
                timestep_trunc=given.get("timestep_trunc"),
                flow_shift=given.get("flow_shift"),
            )
            reasoning_ids = None
            if mode == "text_image":
                text_kwargs = check.text_kwargs(
                    text_kwargs, default_max_new_tokens=DEFAULT_REASONING_TOKENS, limits=self.limits
                )
                reasoning_ids = self._generate_text(
                    prompts, images, "text_image", system_prompt, text_kwargs, None, token_callback
                )
            pictures = self._generate_images(prompts, images, system_prompt, settings, reasoning_ids, callback)
            return InternVLUPipelineOutput(
                generate_output=reasoning_ids,
                text=self._decode(reasoning_ids) if reasoning_ids is not None else None,
                images=pictures,
            )
