"""Image jobs: text-to-image and editing, from a validated request to denoised latents."""

from __future__ import annotations

import torch
from PIL import Image

from . import validation as check
from .conditioning import conditioning_spans, reassemble_with_reasoning
from .errors import InvalidInputError
from .limits import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .pipeline_types import Conditioning, DiffusionSettings, ImageRequest, Reasoning, check_reasoning
from .processor import ProcessorOutput
from .sampling import FLOW_SHIFT, RENORM_TIMESTEP, StepCallback, combine_guidance, make_scheduler
from .tracing import RunTrace


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


class ImageJobs:
    """``generate`` and ``edit``: request → settings → conditioning → denoising (a part of :class:`InternVLUPipeline`)."""

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
        """Each missing side defaults to the first input image's, fitted to the size limits; text-to-image keeps None."""
        if pictures:
            fitted_width, fitted_height = check.fitted_size(pictures[0].width, pictures[0].height, self.limits)
            width = fitted_width if width is None else width
            height = fitted_height if height is None else height
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
            timestep_trunc=check.timestep_trunc(RENORM_TIMESTEP if timestep_trunc is None else timestep_trunc, self.limits),
            flow_shift=check.flow_shift(FLOW_SHIFT if flow_shift is None else flow_shift, self.limits),
        )

    def _generate_images(self, prompts, images, system_prompt, settings, reasoning_ids, callback) -> list[Image.Image]:
        with self._releasing_accelerator_on_failure():
            return self._generate_images_unsafe(prompts, images, system_prompt, settings, reasoning_ids, callback)

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
        if hasattr(scheduler, "set_begin_index"):
            # Start at the first timestep even where rounding repeats it (many steps, a strong shift): looked
            # up by value, the solver would start one step in and run past its last sigma (IndexError).
            scheduler.set_begin_index(0)
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
