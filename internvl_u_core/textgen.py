"""Autoregressive text from the VLM (understanding and chain-of-thought) through transformers' ``generate``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .errors import GenerationCancelled
from .vlm import InternVLUChatModel

TokenCallback = Callable[[int, int], "bool | None"]
TextCallback = Callable[[str], "bool | None"]
IdsCallback = Callable[[torch.Tensor], "bool | None"]


def _token_progress(callback: TokenCallback | None, ids_callback: IdsCallback | None, total: int):
    """A stopping criterion that reports each decoding step and stops every row on ``False``.

    ``callback`` gets ``(step, total)``, ``ids_callback`` the new ids so far ``[rows, step]``.
    Built on demand so that importing this package does not import transformers.
    """
    from transformers import StoppingCriteria

    class TokenProgress(StoppingCriteria):
        def __init__(self):
            self.steps = 0
            self.cancelled = False

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            self.steps += 1
            if callback is not None and callback(self.steps, total) is False:
                self.cancelled = True
            if ids_callback is not None and not self.cancelled and ids_callback(input_ids) is False:
                self.cancelled = True
            return torch.full((input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device)

    return TokenProgress()


def seeded(seed: int | None, device: torch.device):
    """Fork the global RNG (transformers samples from it) and seed it, or do nothing."""
    if seed is None:
        return contextlib.nullcontext()
    devices = [device] if device.type == "cuda" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=devices))
    torch.manual_seed(seed)
    return stack


@torch.inference_mode()
def generate_tokens(
    vlm: InternVLUChatModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    *,
    stop_ids: list[int],
    gen_kwargs: dict,
    seed: int | None = None,
    token_callback: TokenCallback | None = None,
    ids_callback: IdsCallback | None = None,
) -> torch.Tensor:
    """New token ids ``[B, T]`` (stop token included, finished rows padded with ``stop_ids[0]``)."""
    embeds = vlm.embed_prompt(input_ids, pixel_values)
    kwargs = dict(gen_kwargs)
    max_new = int(kwargs.get("max_new_tokens", 20))
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList()
    progress = None
    if token_callback is not None or ids_callback is not None:
        progress = _token_progress(token_callback, ids_callback, max_new)
        criteria.append(progress)
    kwargs["return_dict_in_generate"] = True
    if not kwargs.get("do_sample"):
        # Greedy/beam search: drop sampling knobs so transformers does not warn about them.
        kwargs.pop("temperature", None)
        kwargs.pop("top_p", None)
    with seeded(seed, embeds.device):
        out = vlm.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
            use_cache=True,
            stopping_criteria=criteria,
            **kwargs,
        )
    if progress is not None and progress.cancelled:
        raise GenerationCancelled("text generation was stopped by the progress callback")
    return out.sequences
