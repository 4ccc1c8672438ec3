"""Batched drawing for servers: several prompts conditioned one by one, denoised together."""

from __future__ import annotations

import copy
import dataclasses

import torch
from PIL import Image

from . import validation as check
from .conditioning import reassemble_with_reasoning
from .errors import InvalidInputError, InvalidInputTypeError
from .limits import DEFAULT_STEPS
from .pipeline_types import Conditioning, Reasoning
from .sampling import StepCallback
from .tracing import RunTrace


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


class BatchedImages:
    """``generate_batch`` and ``check_request``, for servers (a part of :class:`InternVLUPipeline`)."""

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

    def check_request(
        self, prompt: str, image_count: int, *, mode: str = "image", reasoning: Reasoning | None = None,
        system_prompt: str | None = None, max_new_tokens: int = 0,
    ) -> None:
        """The checks a call makes of one prompt's content, without running the model (for servers' admission).

        ``mode`` is ``"text"`` (understand), ``"text_image"`` (reason) or ``"image"`` (generate/edit, with
        ``reasoning`` if it follows one). Raises what the call would: a reasoning made for other images or
        with ids outside the vocabulary, image slots that do not match the images, a prompt (plus
        ``max_new_tokens``) longer than the model's context. A server runs this before queueing, so a
        request that would fail inside a shared batch is refused alone.
        """
        self._check_reasoning(reasoning, [None] * image_count, "reasoning")
        placeholders = [Image.new("RGB", (1, 1))] * image_count  # token counts do not depend on image sizes
        with self._admission_lock:
            # A tokenizer of its own: a fast tokenizer used from two threads at once can fail ("Already
            # borrowed"), and the model's own may be busy with a running job.
            if self._admission_processor is None:
                self._admission_processor = copy.copy(self.processor)
                self._admission_processor.tokenizer = copy.deepcopy(self.processor.tokenizer)
            rows_mode = "text_image" if mode == "image" and reasoning is not None else mode  # as _prepare_conditioning
            batch = self._admission_processor([prompt], [placeholders], rows_mode, system_prompt)
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        if reasoning is not None:
            input_ids, attention_mask = reassemble_with_reasoning(
                input_ids, attention_mask, self._reasoning_ids(reasoning), n=1, im_end_id=self.im_end_id,
                img_id=self.img_id,
            )
        check.prompt_length(input_ids.shape[1], max_new_tokens, self.max_prompt_tokens, "prompt")
