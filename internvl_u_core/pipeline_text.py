"""Text jobs: understanding and chain-of-thought reasoning, and the first answer token's logits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import validation as check
from .errors import GenerationCancelled
from .limits import DEFAULT_ANSWER_TOKENS, DEFAULT_REASONING_TOKENS
from .pipeline_types import Reasoning
from .streaming import IncrementalDecoder
from .textgen import TextCallback, TokenCallback, generate_tokens


class TextJobs:
    """``understand``, ``understand_each``, ``reason`` (a part of :class:`InternVLUPipeline`)."""

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
        decoder = IncrementalDecoder(self._decode_list) if streaming else None
        with self._lock:
            ids = self._generate_text(
                [text], [pictures], mode, system_prompt, kwargs, seed, token_callback,
                self._streaming_text(decoder, text_callback) if streaming else None,
            )
        if text_callback is not None:
            # Beam search knows its answer only at the end; a stream ends on the whole answer, with any
            # incomplete character the last tokens left (decoded as U+FFFD) that it held back.
            answer = self._decode(ids)[0]
            if not streaming or decoder.text != answer:
                check.run_text_callback(text_callback, answer)
        return ids, pictures

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

    def _decode(self, ids: torch.Tensor) -> list[str]:
        return self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)

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

    @staticmethod
    def _streaming_text(decoder: IncrementalDecoder, text_callback: TextCallback):
        """An ids callback that hands ``text_callback`` the answer so far, decoding only each step's new tokens."""
        def on_ids(new_ids: torch.Tensor):  # once per token, as before: a split character adds no text yet
            decoder.push(new_ids[0, decoder.token_count :].tolist())
            return text_callback(decoder.text)

        return on_ids

    def _decode_list(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)
