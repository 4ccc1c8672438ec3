"""Recording what an image run computed, stage by stage, to compare it with the reference's outputs."""

from __future__ import annotations

from collections.abc import Callable

import torch

TraceSink = Callable[[str, torch.Tensor], None]


class RunTrace:
    """Sends the named tensors of one image run to ``sink(name, tensor)``; does nothing without a sink.

    Names are those of the reference fixtures (``processor.0.input_ids``, ``decoder_step0.output``,
    ``diffusion.latents_after_step.3`` …). The ``decoder_step0.*`` and ``diffusion.raw_noise_pred.*``
    records are what the decoder really received and returned. When identical guidance rows are
    computed once they have fewer rows than the reference's three groups; ``decoder.reference_rows``
    gives, for each of the reference's rows, the decoder row that computed it.
    """

    def __init__(self, sink: TraceSink | None):
        self.sink = sink

    def record(self, name: str, value: torch.Tensor) -> None:
        if self.sink is not None:
            self.sink(name, value.detach().cpu())

    def prompts(self, batch, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The processor's batch, and the ids the VLM's image stage reads (with any reasoning spliced in)."""
        if self.sink is None:
            return
        for name in ("input_ids", "attention_mask", "pixel_values", "pixel_values_gen", "image_grid_thw_gen",
                     "generation_flags"):
            if getattr(batch, name) is not None:
                self.record(f"processor.0.{name}", getattr(batch, name))
        self.record("vlm_image_stage.input_ids.0", input_ids)
        self.record("vlm_image_stage.attention_mask.0", attention_mask)

    def conditioning(self, spans: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Each guidance row's VLM features and image-token mask."""
        for row, (states, image_mask) in enumerate(spans):
            self.record(f"cond.encoder_hidden_states.{row}", states)
            self.record(f"cond.encoder_image_token_mask.{row}", image_mask)

    def decoder_context(self, hidden: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor,
                        reference_rows: list[int]) -> None:
        """The padded text stream the decoder gets, and which decoder row stands for each reference row."""
        self.record("decoder.reference_rows", torch.tensor(reference_rows, dtype=torch.long))
        self.record("decoder_step0.encoder_hidden_states", hidden)
        self.record("decoder_step0.encoder_attention_mask", text_mask)
        self.record("decoder_step0.encoder_image_token_mask", image_mask)

    def step(self, index: int, t: torch.Tensor, decoder_input: torch.Tensor, timestep: torch.Tensor,
             prediction: torch.Tensor, guided: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> None:
        """One sampler step: the decoder's input and output, the guided prediction, the latents before and after."""
        if index == 0:
            self.record("decoder_step0.hidden_states", decoder_input)
            self.record("decoder_step0.timestep", timestep)
            self.record("decoder_step0.output", prediction)
        self.record(f"diffusion.timestep.{index}", t)
        self.record(f"diffusion.raw_noise_pred.{index}", prediction)
        self.record(f"diffusion.guided_noise_pred.{index}", guided)
        self.record(f"diffusion.latents_before_step.{index}", before)
        self.record(f"diffusion.latents_after_step.{index}", after)
