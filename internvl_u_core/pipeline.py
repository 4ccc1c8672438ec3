"""``InternVLUPipeline``: load the released checkpoint layout and run the four jobs.

Data flows one way: processor → VLM → conditioning → diffusion transformer → VAE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from . import offload as offloading
from . import quantization as quantizing
from . import validation as check
from .conditioning import conditioning_spans, reassemble_with_reasoning
from .errors import GenerationCancelled, InvalidInputError, InvalidInputTypeError, ModelLoadError
from .limits import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_GUIDANCE,
    DEFAULT_LIMITS,
    DEFAULT_REASONING_TOKENS,
    DEFAULT_STEPS,
)
from .loading import component_folder, import_model_libraries, load_weights_into, read_json, resolve_checkpoint
from .processor import IM_END, IM_START, IMG_CONTEXT, IMG_START, InternVLUProcessor, ProcessorOutput
from .sampling import (
    FLOW_SHIFT,
    RENORM_TIMESTEP,
    LatentCodec,
    StepCallback,
    combine_guidance,
    latents_preview,
    make_scheduler,
    pixels_to_pil,
    use_reference_norms,
)
from .textgen import TextCallback, TokenCallback, generate_tokens
from .tracing import RunTrace, TraceSink
from .vlm import SPECIAL_TOKENS, InternVLUChatModel, VLMConfig

logger = logging.getLogger("internvl_u_core")

TEXT_KWARGS = (
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "num_beams",
    "return_dict_in_generate", "output_hidden_states",
)
DIFFUSION_KWARGS = (
    "num_inference_steps", "num_images_per_prompt", "all_cfg_scale", "part_cfg_scale",
    "height", "width", "generator", "timestep_trunc", "flow_shift",
)


@dataclass
class InternVLUPipelineOutput:
    """What a reference-style call returns."""

    generate_output: torch.LongTensor | None = None  # new token ids [n, T] (text modes)
    text: list[str] | None = None  # decoded ``generate_output``, special tokens skipped
    images: list[Image.Image] | None = None


@dataclass(frozen=True)
class DiffusionSettings:
    """A validated image request: output size, steps, copies per prompt, guidance and noise source."""

    height: int
    width: int
    steps: int
    images_per_prompt: int
    all_cfg_scale: float
    part_cfg_scale: float
    generator: torch.Generator | list[torch.Generator] | None
    timestep_trunc: float = RENORM_TIMESTEP  # guidance renormalised at integer timesteps above it (<= 0: never)
    flow_shift: float = FLOW_SHIFT


@dataclass(frozen=True)
class Conditioning:
    """What the decoder is conditioned on, one entry per guidance row (full, part, uncond × prompts)."""

    spans: list[tuple[torch.Tensor, torch.Tensor]]  # the row's VLM features and their image-token mask
    image_fhw: list[torch.Tensor]  # ViT grid (frames, h, w) of each input image of the row
    references: list[torch.Tensor | None]  # VAE latents of the row's input images
    reference_grids: list[torch.Tensor | None]  # their latent grids
    target_grid: torch.Tensor  # [rows, 3] latent grid of the image to draw
    uncond_equals_part: bool  # no input images: the two dropped rows are one prompt, computed once


@dataclass(frozen=True)
class Reasoning:
    """A chain-of-thought from :meth:`InternVLUPipeline.reason`, reusable by ``generate``/``edit``."""

    text: str
    token_ids: tuple[int, ...]  # raw generated ids, stop token included, as the reference returns them
    prompt: str
    num_images: int
    system_prompt: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready fields (how a server sends a reasoning and takes it back)."""
        return {"text": self.text, "token_ids": list(self.token_ids), "prompt": self.prompt,
                "num_images": self.num_images, "system_prompt": self.system_prompt}

    @classmethod
    def from_dict(cls, data, name: str = "reasoning") -> Reasoning:
        """The inverse of :meth:`to_dict`; a malformed ``data`` raises an error naming the bad field."""
        if not isinstance(data, dict):
            raise InvalidInputTypeError(f"{name} must be an object with text, token_ids, prompt and num_images")
        ids, images, system = data.get("token_ids"), data.get("num_images", 0), data.get("system_prompt")
        if not isinstance(data.get("text"), str) or not isinstance(data.get("prompt", ""), str):
            raise InvalidInputTypeError(f"{name}.text and {name}.prompt must be strings")
        ids = check.token_ids(ids, f"{name}.token_ids")
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise InvalidInputError(f"{name}.num_images must be a non-negative integer, got {images!r}")
        if system is not None and not isinstance(system, str):
            raise InvalidInputTypeError(f"{name}.system_prompt must be a string or null")
        return cls(data["text"], ids, data.get("prompt", ""), images, system)


def check_reasoning(reasoning, num_images: int, name: str = "reasoning") -> None:
    """A ``reasoning`` argument is None or a :class:`Reasoning` made for as many input images as the call has."""
    if reasoning is None:
        return
    if not isinstance(reasoning, Reasoning):
        raise InvalidInputError(f"{name} must be a Reasoning from reason(...), got {type(reasoning).__name__}")
    if reasoning.num_images != num_images:
        raise InvalidInputError(
            f"{name} was made for {reasoning.num_images} input image(s) but {num_images} were given; "
            "call reason() with the same images"
        )


@dataclass(frozen=True)
class ImageRequest:
    """The drawing options of ``generate``/``edit`` as the caller gave them (``None``: the default)."""

    width: int | None
    height: int | None
    steps: int
    all_cfg_scale: float | None
    part_cfg_scale: float | None
    timestep_trunc: float | None
    flow_shift: float | None
    seed: int | None
    generator: torch.Generator | None
    num_images: int
    reasoning: Reasoning | None
    system_prompt: str | None
    callback: StepCallback | None


class InternVLUPipeline:
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
        #: How the LLM and the DiT are quantised (None: full precision); see ``internvl_u_core.quantization``.
        self.quantization = quantization
        self._offload: offloading.Offloader | None = None
        # Skip work whose result the reference throws away (benchmarks switch it off to compare).
        self.dedupe_guidance_rows = True
        self.limits = replace(DEFAULT_LIMITS)
        # Tests set this to a callable(name, tensor) to compare every stage with the reference (see tracing).
        self.recorder: TraceSink | None = None
        tok = processor.token_id
        self.im_start_id = tok(IM_START)
        self.im_end_id = tok(IM_END)
        self.img_id = tok(IMG_START)
        self.image_context_id = tok(IMG_CONTEXT)
        self.eos_id = processor.tokenizer.eos_token_id if processor.tokenizer.eos_token_id is not None else self.im_end_id
        vocab = processor.tokenizer.get_vocab()
        vlm.set_special_token_ids([vocab.get(t, -1) for t in SPECIAL_TOKENS], self.image_context_id)

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
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
            say(f"Quantising the LLM as it loads: {plan.describe()}")
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
                say(f"Quantising the DiT as it loads: {plan.describe()}")
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

    # ------------------------------------------------------------------------------------------
    # Devices and memory
    # ------------------------------------------------------------------------------------------
    @property
    def components(self) -> dict[str, torch.nn.Module]:
        parts = {"vlm": self.vlm, "generation_decoder": self.generation_decoder, "vae": self.vae}
        return {name: module for name, module in parts.items() if module is not None}

    @property
    def device(self) -> torch.device:
        return self._offload.device if self._offload is not None else next(self.vlm.parameters()).device

    @property
    def offload_mode(self) -> str | None:
        """The active offload mode (``model``, ``group``, ``sequential``), or None."""
        return self._offload.mode if self._offload is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vlm.parameters()).dtype

    def to(self, device: str | torch.device) -> InternVLUPipeline:
        device = check.device(device)
        with self._lock:
            if self._offload is not None:
                self._offload.remove()
                self._offload = None
            for module in self.components.values():
                module.to(device)
        return self

    def enable_offload(self, mode: str = "model", device: str | torch.device | None = None) -> None:
        """Keep the weights in CPU memory and move them to ``device`` (default: CUDA) while they run.

        ``mode``: ``"model"`` moves whole components, ``"group"`` streams the ViT, LLM and DiT blocks
        one at a time, ``"sequential"`` moves every layer for its own call (least GPU memory, slowest);
        see ``internvl_u_core.offload``. ``pipe.to(device)`` switches offloading off again.
        """
        mode = offloading.check_mode(mode)
        if mode is None:
            raise InvalidInputError("offload=None: pass one of model, group, sequential, or call pipe.to(device)")
        self._enable_offload(mode, offloading.check_device(mode, device))

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Keep components on the CPU and move each to ``device`` (default: CUDA) only while it runs."""
        self._enable_offload("model", offloading.check_device("model", device, option="enable_model_cpu_offload()"))

    def release_accelerator(self) -> None:
        """Under offloading, move every weight back to the CPU memory (frees the GPU between jobs)."""
        with self._lock:
            if self._offload is not None:
                self._offload.activate(self.components, None)

    def _enable_offload(self, mode: str, device: torch.device) -> None:
        _check_offload_with(self.quantization, mode)
        with self._lock:
            if self._offload is not None:
                self._offload.remove()
            self._offload = offloading.attach(self.components, mode, device)

    def enable_vae_tiling(self, enabled: bool = True) -> None:
        """Decode/encode large images in overlapping tiles to cap VAE memory (results differ slightly at seams)."""
        if self.vae is None:
            return
        if enabled:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()

    def compile_transformer(self, **compile_kwargs) -> None:
        """Opt-in regional ``torch.compile`` of the DiT's repeated blocks (same numbers; pays off on CUDA).

        The first image compiles (tens of seconds); a new size or batch layout compiles again.
        ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``).
        """
        self._require_generation()
        self.generation_decoder.decoder.compile_repeated_blocks(fullgraph=True, **compile_kwargs)

    def model_size_bytes(self) -> int:
        """Bytes of all weights and buffers as stored (quantised weights at their packed size)."""
        return sum(quantizing.module_bytes(module) for module in self.components.values())

    def _activate(self, module: torch.nn.Module) -> torch.device:
        """Device a component runs on now (moving it, or its whole-moving parts, there first under offload)."""
        if self._offload is not None:
            return self._offload.activate(self.components, module)
        return next(module.parameters()).device

    def _require_generation(self) -> None:
        if self.generation_decoder is None:
            raise InvalidInputError("this pipeline was loaded without the image components; load it with them to draw")

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

    # ------------------------------------------------------------------------------------------
    # Friendly jobs
    # ------------------------------------------------------------------------------------------
    def understand(
        self,
        images,
        question: str,
        *,
        max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        seed: int | None = None,
        system_prompt: str | None = None,
        token_callback: TokenCallback | None = None,
        text_callback: TextCallback | None = None,
    ) -> str:
        """Answer ``question`` about zero, one or several images."""
        ids, _ = self._text_job(
            question, "question", images, "text", system_prompt, seed, token_callback, text_callback,
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, num_beams=num_beams,
        )
        return self._decode(ids)[0]

    def understand_each(
        self,
        images,
        question: str,
        *,
        batch_size: int = 8,
        max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        seed: int | None = None,
        system_prompt: str | None = None,
        token_callback: TokenCallback | None = None,
        image_callback: Callable[[int, int], bool | None] | None = None,
    ) -> list[str]:
        """One answer per image, each the one ``understand(image, question)`` gives for that image alone.

        Greedy and beam search run images of equal size together, ``batch_size`` at a time (their
        prompts have equal length, so no row is padded). With ``do_sample`` each image runs alone
        with ``seed``, as the one-image call does. ``image_callback(done, total)`` follows each
        batch; returning ``False`` stops the run with ``GenerationCancelled``.
        """
        question = check.text(question, "question", self.limits)
        pictures = check.image_each(images, "images", self.limits)
        batch_size = check.integer(batch_size, "batch_size", 1, self.limits.max_images_per_prompt)
        kwargs = check.text_kwargs(
            dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                 temperature=temperature, top_p=top_p, num_beams=num_beams),
            default_max_new_tokens=None, limits=self.limits,
        )
        seed = check.optional_seed(seed, self.limits)
        system_prompt = check.system_prompt(system_prompt, self.limits)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, picture in enumerate(pictures):
            by_size.setdefault(picture.size, []).append(index)
        width = 1 if kwargs.get("do_sample") else batch_size
        batches = [group[i : i + width] for group in by_size.values() for i in range(0, len(group), width)]
        answers: list[str] = [""] * len(pictures)
        done = 0
        with self._lock:
            for batch in batches:
                ids = self._generate_text([question] * len(batch), [[pictures[i]] for i in batch], "text",
                                          system_prompt, kwargs, seed, token_callback)
                for index, answer in zip(batch, self._decode(ids)):
                    answers[index] = answer
                done += len(batch)
                if image_callback is not None and image_callback(done, len(pictures)) is False:
                    raise GenerationCancelled(f"understand_each was stopped by image_callback after {done} images")
        return answers

    def reason(
        self,
        prompt: str,
        images=None,
        *,
        max_new_tokens: int = DEFAULT_REASONING_TOKENS,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        seed: int | None = None,
        system_prompt: str | None = None,
        token_callback: TokenCallback | None = None,
        text_callback: TextCallback | None = None,
    ) -> Reasoning:
        """The chain-of-thought the model writes before drawing (``text_image`` mode's first stage)."""
        ids, pictures = self._text_job(
            prompt, "prompt", images, "text_image", system_prompt, seed, token_callback, text_callback,
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, num_beams=num_beams,
        )
        return Reasoning(
            text=self._decode(ids)[0],
            token_ids=tuple(ids[0].tolist()),
            prompt=prompt,
            num_images=len(pictures),
            system_prompt=system_prompt,
        )

    def _text_job(self, text, name, images, mode, system_prompt, seed, token_callback, text_callback, **sampling):
        """Validate one prompt's text job and decode it; returns the new ids and the loaded images."""
        text = check.text(text, name, self.limits)
        pictures = check.image_list(images, "images", allow_empty=True, limits=self.limits)
        kwargs = check.text_kwargs(sampling, default_max_new_tokens=None, limits=self.limits)
        seed = check.optional_seed(seed, self.limits)
        system_prompt = check.system_prompt(system_prompt, self.limits)
        streaming = text_callback is not None and kwargs.get("num_beams", 1) == 1
        ids_callback = (lambda new_ids: text_callback(self._decode(new_ids[:1])[0])) if streaming else None
        with self._lock:
            ids = self._generate_text(
                [text], [pictures], mode, system_prompt, kwargs, seed, token_callback, ids_callback
            )
        if text_callback is not None and not streaming:  # beam search knows its answer only at the end
            check.run_text_callback(text_callback, self._decode(ids)[0])
        return ids, pictures

    def generate(
        self,
        prompt: str,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULT_STEPS,
        all_cfg_scale: float | None = None,
        part_cfg_scale: float | None = None,
        timestep_trunc: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_images: int = 1,
        reasoning: Reasoning | None = None,
        system_prompt: str | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Text to image. With ``reasoning`` from :meth:`reason` this equals ``text_image`` mode."""
        prompt = check.text(prompt, "prompt", self.limits)
        request = ImageRequest(
            width=width, height=height, steps=steps, all_cfg_scale=all_cfg_scale, part_cfg_scale=part_cfg_scale,
            timestep_trunc=timestep_trunc, flow_shift=flow_shift, seed=seed, generator=generator, num_images=num_images, reasoning=reasoning,
            system_prompt=system_prompt, callback=callback,
        )
        return self._draw(prompt, [], request)

    def edit(
        self,
        images,
        instruction: str,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULT_STEPS,
        all_cfg_scale: float | None = None,
        part_cfg_scale: float | None = None,
        timestep_trunc: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_images: int = 1,
        reasoning: Reasoning | None = None,
        system_prompt: str | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Edit one or several input images following ``instruction``; output size defaults to the first input's."""
        instruction = check.text(instruction, "instruction", self.limits)
        pictures = check.image_list(images, "images", allow_empty=False, limits=self.limits)
        request = ImageRequest(
            width=width, height=height, steps=steps, all_cfg_scale=all_cfg_scale, part_cfg_scale=part_cfg_scale,
            timestep_trunc=timestep_trunc, flow_shift=flow_shift, seed=seed, generator=generator, num_images=num_images, reasoning=reasoning,
            system_prompt=system_prompt, callback=callback,
        )
        return self._draw(instruction, pictures, request)

    @torch.inference_mode()
    def next_token_logits(self, question: str, images=None, *, system_prompt: str | None = None) -> torch.Tensor:
        """The LLM's float32 logits ``[vocab]`` for the first answer token of ``understand(images, question)``.

        What a change of precision does to the text path, measured without decoding (``bench/quant.py``
        compares them across quantisation modes).
        """
        question = check.text(question, "question", self.limits)
        pictures = check.image_list(images, "images", allow_empty=True, limits=self.limits)
        system_prompt = check.system_prompt(system_prompt, self.limits)
        with self._lock:
            batch = self.processor([question], [pictures], "text", system_prompt)
            device = self._activate(self.vlm)
            pixel_values = batch.pixel_values.to(device) if batch.pixel_values is not None else None
            embeds = self.vlm.embed_prompt(batch.input_ids.to(device), pixel_values)
            out = self.vlm.language_model(
                inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device), logits_to_keep=1
            )
            return out.logits[0, -1].float().cpu()

    def generate_batch(
        self,
        prompts: list[str],
        seeds: list[int | None],
        *,
        images: list | None = None,
        reasonings: list[Reasoning | None] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULT_STEPS,
        all_cfg_scale: float | None = None,
        part_cfg_scale: float | None = None,
        timestep_trunc: float | None = None,
        flow_shift: float | None = None,
        system_prompt: str | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """One image per prompt, image ``i`` bit-identical to ``generate``/``edit`` of prompt ``i`` with ``seeds[i]`` alone.

        For servers: each prompt is conditioned on its own (its positions and padding are those of a
        lone call) and only the denoising passes are shared. ``images[i]`` holds the edit inputs of
        prompt ``i`` (all prompts edit, or none does); ``reasonings[i]`` a :class:`Reasoning` (all
        prompts have one, or none has). Every output has the same size; ``None`` sides default as in
        ``generate``/``edit`` and must then agree.
        """
        self._require_generation()
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidInputTypeError("prompts must be a non-empty list of strings")
        count = len(prompts)
        prompts = [check.text(p, f"prompts[{i}]", self.limits) for i, p in enumerate(prompts)]
        for name, values in {"seeds": seeds, "images": images, "reasonings": reasonings}.items():
            if (values is not None or name == "seeds") and (
                not isinstance(values, (list, tuple)) or len(values) != count
            ):
                raise InvalidInputError(f"{name} must be a list with one entry per prompt ({count})")
        generators = [_seeded_or_random(check.optional_seed(seed, self.limits)) for seed in seeds]
        pictures = [
            check.image_list(entry, f"images[{i}]", allow_empty=images is None, limits=self.limits)
            for i, entry in enumerate(images or [None] * count)
        ]
        reasonings = list(reasonings or [None] * count)
        if len({r is None for r in reasonings}) > 1:
            raise InvalidInputError("reasonings: give a Reasoning for every prompt or for none (their defaults differ)")
        for i, (reasoning, inputs) in enumerate(zip(reasonings, pictures)):
            self._check_reasoning(reasoning, inputs, f"reasonings[{i}]")
        sizes = {self._default_size(inputs, width, height) for inputs in pictures}
        if len(sizes) > 1:
            raise InvalidInputError(
                "width/height: the prompts' outputs would have different sizes (their first input images differ); "
                "give width and height"
            )
        width, height = sizes.pop()
        system_prompt = check.system_prompt(system_prompt, self.limits)
        with self._lock, self._releasing_accelerator_on_failure(), torch.inference_mode():
            settings = self._diffusion_settings(
                "image" if reasonings[0] is None else "text_image", height=height, width=width, steps=steps,
                images_per_prompt=1, all_cfg_scale=all_cfg_scale, part_cfg_scale=part_cfg_scale,
                generator=generators, names=check.API_NAMES, timestep_trunc=timestep_trunc, flow_shift=flow_shift,
            )
            trace = RunTrace(None)  # the fixtures' traces describe one call, not a shared pass
            prepared = [
                self._prepare_conditioning([prompt], [inputs], system_prompt, settings, self._reasoning_ids(reasoning),
                                           trace)
                for prompt, inputs, reasoning in zip(prompts, pictures, reasonings)
            ]
            # _sample reads only the prompt count and the (shared) generation size from the batch.
            batch = dataclasses.replace(prepared[0][0], num_prompts=count)
            cond = _merge_conditions([cond for _, cond in prepared])
            latents = self._sample(batch, cond, settings, callback, trace)
            return self._to_pictures(latents, (settings.width, settings.height), trace)

    def decode_latents_preview(
        self, latents: torch.Tensor, rgb_factors: torch.Tensor | None = None, rgb_bias: torch.Tensor | None = None
    ) -> Image.Image:
        """A cheap RGB preview of the current latents (no VAE pass); see ``sampling.latents_preview``."""
        return latents_preview(latents, rgb_factors, rgb_bias)

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Images from normalised latents ``[N, C, H/8, W/8]``, decoded as ``generate``/``edit`` decode theirs."""
        self._require_generation()
        latents = check.latents(latents, self.codec.mean.shape[1])
        with self._lock:
            self._activate(self.vae)
            return [picture for sample in latents.split(1) for picture in pixels_to_pil(self.codec.decode(sample))]

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's normalised latents in the VAE's own latent space (``z·std + mean``, float32).

        That space is what other tools hold, e.g. ComfyUI's LATENT for the Qwen-Image VAE.
        """
        self._require_generation()
        return self.codec.denormalize(check.latents(latents, self.codec.mean.shape[1]))

    def from_vae_latents(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_vae_latents`: VAE-space latents → the pipeline's normalised latents."""
        self._require_generation()
        return self.codec.normalize(check.latents(vae_latents, self.codec.mean.shape[1]))

    # ------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------
    def _draw(self, prompt: str, pictures: list[Image.Image], request: ImageRequest) -> list[Image.Image]:
        self._require_generation()
        reasoning = request.reasoning
        self._check_reasoning(reasoning, pictures, "reasoning")
        system_prompt = check.system_prompt(request.system_prompt, self.limits)
        width, height = self._default_size(pictures, request.width, request.height)
        generator = request.generator
        if generator is None:
            generator = check.seed_generator(check.optional_seed(request.seed, self.limits))
        with self._lock:
            settings = self._diffusion_settings(
                "image" if reasoning is None else "text_image",
                height=height,
                width=width,
                steps=request.steps,
                images_per_prompt=request.num_images,
                all_cfg_scale=request.all_cfg_scale,
                part_cfg_scale=request.part_cfg_scale,
                generator=generator,
                names=check.API_NAMES,
                timestep_trunc=request.timestep_trunc,
                flow_shift=request.flow_shift,
            )
            return self._generate_images(
                [prompt], [pictures], system_prompt, settings, self._reasoning_ids(reasoning), request.callback
            )

    def _default_size(self, pictures, width, height) -> tuple[int | None, int | None]:
        """Each missing side defaults to the first input image's (at least the smallest size); text-to-image keeps None."""
        if pictures:
            width = max(pictures[0].width, self.limits.min_side) if width is None else width
            height = max(pictures[0].height, self.limits.min_side) if height is None else height
        return width, height

    def _check_reasoning(self, reasoning, pictures, name: str) -> None:
        """:func:`check_reasoning`, and its token ids must be in this model's vocabulary."""
        check_reasoning(reasoning, len(pictures), name)
        if reasoning is None:
            return
        vocabulary = self.vlm.language_model.get_input_embeddings().num_embeddings
        check.token_ids(reasoning.token_ids, f"{name}.token_ids", vocabulary)

    @staticmethod
    def _reasoning_ids(reasoning: Reasoning | None) -> torch.Tensor | None:
        return None if reasoning is None else torch.tensor([list(reasoning.token_ids)], dtype=torch.long)

    def _decode(self, ids: torch.Tensor) -> list[str]:
        return self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _diffusion_settings(
        self, mode: str, *, height, width, steps, images_per_prompt, all_cfg_scale, part_cfg_scale, generator,
        names: check.ArgumentNames, timestep_trunc=None, flow_shift=None,
    ) -> DiffusionSettings:
        """Validate the caller's values; ``None`` sizes and scales take the checkpoint's and the mode's defaults."""
        config = self.generation_decoder.config
        default_size = (config.gen_image_height, config.gen_image_width)
        height, width = check.requested_size(height, width, default_size, self.limits, names)
        default_all, default_part = DEFAULT_GUIDANCE[mode]
        return DiffusionSettings(
            height=height,
            width=width,
            steps=check.steps(steps, self.limits, names.steps),
            images_per_prompt=check.num_images(images_per_prompt, self.limits, names.num_images),
            all_cfg_scale=check.guidance_scale(
                default_all if all_cfg_scale is None else all_cfg_scale, names.all_cfg_scale, self.limits
            ),
            part_cfg_scale=check.guidance_scale(
                default_part if part_cfg_scale is None else part_cfg_scale, names.part_cfg_scale, self.limits
            ),
            generator=check.generator(generator),
            timestep_trunc=check.finite(RENORM_TIMESTEP if timestep_trunc is None else timestep_trunc, "timestep_trunc"),
            flow_shift=check.positive(FLOW_SHIFT if flow_shift is None else flow_shift, "flow_shift"),
        )

    def _generate_text(
        self, prompts, images, mode, system_prompt, text_kwargs, seed, token_callback, ids_callback=None
    ) -> torch.Tensor:
        """Run the processor and decode new tokens; ``text_image`` uses the full-condition rows only."""
        batch = self.processor(prompts, images, mode, system_prompt)
        n = len(prompts)
        device = self._activate(self.vlm)
        input_ids = batch.input_ids[:n].to(device)
        attention_mask = batch.attention_mask[:n].to(device)
        pixel_values = None
        if batch.pixel_values is not None:
            count = sum(batch.images_per_prompt)
            pixel_values = batch.pixel_values[:count].to(device)
        check.prompt_length(input_ids.shape[1], text_kwargs.get("max_new_tokens", 20), self.max_prompt_tokens, "prompt")
        return generate_tokens(
            self.vlm, input_ids, attention_mask, pixel_values,
            stop_ids=[self.eos_id, self.img_id], gen_kwargs=text_kwargs, seed=seed, token_callback=token_callback,
            ids_callback=ids_callback,
        ).cpu()

    @property
    def max_prompt_tokens(self) -> int:
        context = int(getattr(self.vlm.language_model.config, "max_position_embeddings", 32768))
        return min(context, self.limits.max_prompt_tokens or context)

    def _generate_images(self, prompts, images, system_prompt, settings, reasoning_ids, callback) -> list[Image.Image]:
        with self._releasing_accelerator_on_failure():
            return self._generate_images_unsafe(prompts, images, system_prompt, settings, reasoning_ids, callback)

    @contextlib.contextmanager
    def _releasing_accelerator_on_failure(self):
        """A cancelled or failed run leaves nothing behind on the accelerator."""
        try:
            yield
        except BaseException:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise

    @torch.inference_mode()
    def _generate_images_unsafe(self, prompts, images, system_prompt, settings, reasoning_ids, callback):
        counts = [len(imgs) for imgs in images]
        if any(counts) and not all(counts):
            raise InvalidInputError(
                "a batch cannot mix editing prompts (with images) and text-to-image prompts (without); "
                "run them as separate calls"
            )
        generator, draws = settings.generator, len(prompts) * settings.images_per_prompt
        if isinstance(generator, list) and len(generator) != draws:  # checked before any model work
            raise InvalidInputError(
                f"generator is a list of {len(generator)} generators but the call draws {draws} images; "
                "pass one generator, or one per image"
            )
        trace = RunTrace(self.recorder)
        batch, cond = self._prepare_conditioning(prompts, images, system_prompt, settings, reasoning_ids, trace)
        latents = self._sample(batch, cond, settings, callback, trace)
        return self._to_pictures(latents, (settings.width, settings.height), trace)

    def _prepare_conditioning(self, prompts, images, system_prompt, settings, reasoning_ids, trace: RunTrace):
        """Processor rows (with the chain-of-thought appended) → ``(batch, conditioning)`` for :meth:`_sample`."""
        mode = "image" if reasoning_ids is None else "text_image"
        batch = self.processor(prompts, images, mode, system_prompt,
                               height=settings.height, width=settings.width)
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        if reasoning_ids is not None:
            input_ids, attention_mask = reassemble_with_reasoning(
                input_ids, attention_mask, reasoning_ids, n=len(prompts), im_end_id=self.im_end_id, img_id=self.img_id
            )
        check.prompt_length(input_ids.shape[1], 0, self.max_prompt_tokens, "prompt")
        trace.prompts(batch, input_ids, attention_mask)
        return batch, self._conditioning(batch, input_ids, attention_mask, trace)

    def _conditioning(self, batch: ProcessorOutput, input_ids, attention_mask, trace: RunTrace) -> Conditioning:
        """VLM hidden states of each row's user turn → padded decoder inputs, plus reference latents."""
        decoder_config = self.generation_decoder.config
        vlm_device = self._activate(self.vlm)
        n = batch.num_prompts
        counts = batch.images_per_prompt
        rows = 3 * n
        unique = sum(counts)  # input images; the `none` and `text` row groups carry the same ones
        image_features = None
        if batch.pixel_values is not None:
            # Both image-carrying row groups hold the same images: run the ViT once.
            vit_dtype = self.vlm.vision_model.embeddings.patch_embedding.weight.dtype
            features = self.vlm.extract_feature(batch.pixel_values[:unique].to(vlm_device, vit_dtype))
            image_features = torch.cat([features, features])
        input_ids, attention_mask = input_ids.to(vlm_device), attention_mask.to(vlm_device)
        # Identical rows without images (text-to-image's two dropped rows) go through the LLM once.
        keep, source = _unique_text_rows(input_ids, attention_mask, self.image_context_id, self.dedupe_guidance_rows)
        features = self.vlm.hidden_states_for_generation(
            input_ids[keep], attention_mask[keep], image_features, list(decoder_config.vlm_select_layer)
        )[source]
        spans = conditioning_spans(
            features, input_ids, attention_mask, im_start_id=self.im_start_id, image_context_id=self.image_context_id
        )
        trace.conditioning(spans)
        # ViT grid per input image of a row (h, w after pixel shuffle).
        side = 0
        if batch.pixel_values is not None:
            vit = self.vlm.config
            side = int(batch.pixel_values.shape[-1] // vit.vision.patch_size * vit.downsample_ratio)
        row_counts = counts + counts + [0] * n
        image_fhw = [torch.tensor([[1, side, side]] * k, dtype=torch.long).reshape(k, 3) for k in row_counts]
        # Reference latents: the input images of the `none` and `text` rows, in row order.
        references: list[torch.Tensor | None] = [None] * rows
        reference_grids: list[torch.Tensor | None] = [None] * rows
        if batch.pixel_values_gen is not None:
            self._activate(self.vae)
            latents = self.codec.encode(batch.pixel_values_gen[:unique])  # both halves hold the same images
            latents = torch.cat([latents, latents])
            trace.record("diffusion.cond_latents", latents)
            grids = batch.image_grid_thw_gen[batch.generation_flags == 0]
            cursor = 0
            for row, k in enumerate(row_counts):
                if k:
                    references[row] = latents[cursor : cursor + k]
                    reference_grids[row] = grids[cursor : cursor + k]
                cursor += k
        return Conditioning(
            spans=spans,
            image_fhw=image_fhw,
            references=references,
            reference_grids=reference_grids,
            target_grid=batch.image_grid_thw_gen[batch.generation_flags == 1],
            uncond_equals_part=torch.equal(source[n : 2 * n], source[2 * n :]),
        )

    def _sample(
        self, batch: ProcessorOutput, cond: Conditioning, settings: DiffusionSettings, callback, trace: RunTrace
    ) -> torch.Tensor:
        """The denoising loop; returns float32 latents ``[n·m, C, H/8, W/8]``."""
        from diffusers.utils.torch_utils import randn_tensor

        decoder = self.generation_decoder
        device = self._activate(decoder)
        dtype = next(decoder.parameters()).dtype
        n, copies = batch.num_prompts, settings.images_per_prompt
        h_gen, w_gen = batch.gen_size
        # Each guidance row repeated `copies` times consecutively: [full×n·m, part×n·m, uncond×n·m];
        # when the dropped rows are identical, the uncond group is not computed at all.
        groups = 2 if cond.uncond_equals_part else 3
        draws = n * copies
        order = [r for r in range(groups * n) for _ in range(copies)]
        spans = [cond.spans[r] for r in order]
        hidden, text_mask, image_mask = decoder.prepare_forward_input(
            [s[0].to(device, dtype) for s in spans], [s[1].to(device) for s in spans]
        )
        computed = list(range(groups * draws))  # the uncond group, when skipped, is the part group's rows
        trace.decoder_context(hidden, text_mask, image_mask, computed if groups == 3 else computed + computed[draws:])
        references = [cond.references[r] for r in order]
        has_refs = any(r is not None for r in references)
        channels = decoder.decoder.latent_channels
        context = decoder.decoder.prepare_context(
            encoder_hidden_states=hidden,
            encoder_attention_mask=text_mask,
            encoder_image_token_mask=image_mask,
            image_grid_thw_gen=cond.target_grid[order].to(device),
            image_fhw_cond=[cond.image_fhw[r].to(device) for r in order],
            conditional_input=[
                (r if r is not None else torch.zeros(0, channels, 1, 1)).to(device, dtype) for r in references
            ] if has_refs else None,
            image_grid_thw_gen_cond=[
                (g if g is not None else torch.zeros(0, 3, dtype=torch.long)).to(device)
                for g in (cond.reference_grids[r] for r in order)
            ] if has_refs else None,
        )
        scale = self.codec.scale_factor
        shape = (draws, channels, h_gen // scale, w_gen // scale)
        latents = randn_tensor(shape, generator=settings.generator, device=device, dtype=torch.float32)
        trace.record("diffusion.initial_latents", latents)
        scheduler = make_scheduler(self.scheduler, settings.flow_shift)
        scheduler.set_timesteps(settings.steps, device=device)
        timestep_scale = decoder.decoder.config.timestep_scale
        total = len(scheduler.timesteps)
        for index, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents] * groups).to(dtype)
            timestep = t.expand(model_input.shape[0]).to(torch.float32) * timestep_scale
            prediction = decoder.decoder.forward_with_context(model_input, timestep, context).to(torch.float32)
            v_full, v_part = prediction[:draws], prediction[draws : 2 * draws]
            v_uncond = prediction[2 * draws :] if groups == 3 else v_part  # identical rows: the same prediction
            guided = combine_guidance(v_full, v_part, v_uncond, int(t), settings.all_cfg_scale, settings.part_cfg_scale,
                                      settings.timestep_trunc)
            stepped = scheduler.step(guided, t, latents, return_dict=False)[0]
            trace.step(index, t, model_input, timestep, prediction, guided, latents, stepped)
            latents = stepped
            check.run_callback(callback, index + 1, total, latents)
        trace.record("diffusion.final_latents", latents)
        return latents

    def _to_pictures(self, latents, requested, trace: RunTrace) -> list[Image.Image]:
        self._activate(self.vae)
        pictures = []
        for sample in latents.split(1):
            pixels = self.codec.decode(sample)
            trace.record("diffusion.decoded_pixels", pixels)
            pictures += pixels_to_pil(pixels)
        if (pictures[0].width, pictures[0].height) != tuple(requested):
            pictures = [p.resize(tuple(requested), Image.Resampling.LANCZOS) for p in pictures]
        return pictures


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


def _seeded_or_random(seed: int | None) -> torch.Generator:
    """The generator ``generate(seed=...)`` would use; a fresh randomly seeded one for ``None``."""
    generator = check.seed_generator(seed)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return generator


def _merge_conditions(conditions: list[Conditioning]) -> Conditioning:
    """Conditionings of single prompts → one batch conditioning, rows ordered ``[full × n, part × n, uncond × n]``."""
    def rows(name):
        return [getattr(cond, name)[group] for group in range(3) for cond in conditions]

    return Conditioning(
        spans=rows("spans"),
        image_fhw=rows("image_fhw"),
        references=rows("references"),
        reference_grids=rows("reference_grids"),
        target_grid=torch.stack(rows("target_grid")),
        uncond_equals_part=all(cond.uncond_equals_part for cond in conditions),
    )


def _unique_text_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_context_id: int, enabled=True):
    """Rows to compute and, for every row, its position among them (rows with images are all kept)."""
    if not enabled:
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return rows, rows
    keep: list[int] = []
    source: list[int] = []
    seen: dict[tuple, int] = {}
    for row in range(input_ids.shape[0]):
        if (input_ids[row] == image_context_id).any():
            key = ("image", row)
        else:
            key = (tuple(input_ids[row].tolist()), tuple(attention_mask[row].tolist()))
        if key not in seen:
            seen[key] = len(keep)
            keep.append(row)
        source.append(seen[key])
    return torch.tensor(keep, device=input_ids.device), torch.tensor(source, device=input_ids.device)


def _build_on_meta(factory):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _split_kwargs(kwargs: dict, mode: str) -> tuple[dict, dict]:
    text, diffusion = {}, {}
    for key, value in kwargs.items():
        if key in TEXT_KWARGS:
            if mode != "image":
                text[key] = value
        elif key in DIFFUSION_KWARGS:
            if mode != "text":
                diffusion[key] = value
        else:
            logger.warning("ignoring unsupported argument %r (the reference pipeline drops it too)", key)
    return text, diffusion


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
