"""From processor rows and VLM hidden states to the generation decoder's conditioning.

Row layout of a batch of ``n`` prompts: ``[full × n, instruction dropped × n, everything dropped × n]``.
"""

from __future__ import annotations

import torch


def user_turn_starts(input_ids: torch.Tensor, im_start_id: int) -> list[int]:
    """Column of the second ``<|im_start|>`` of each row (the user turn; the system turn is first)."""
    starts = []
    for b, row in enumerate(input_ids):
        cols = (row == im_start_id).nonzero().flatten().tolist()
        if len(cols) < 2:
            raise ValueError(f"row {b} of the generation batch has no user turn")
        starts.append(cols[1])
    return starts


def conditioning_spans(
    features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    im_start_id: int,
    image_context_id: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: features and ``<IMG_CONTEXT>`` mask from the user turn through the last token (the target ``<img>``)."""
    spans = []
    for b, start in enumerate(user_turn_starts(input_ids, im_start_id)):
        keep = attention_mask[b, start:].bool()
        ids = input_ids[b, start:][keep]
        spans.append((features[b, start:][keep], ids == image_context_id))
    return spans


def reassemble_with_reasoning(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    reasoning_ids: torch.Tensor,
    *,
    n: int,
    im_end_id: int,
    img_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each chain-of-thought to its full-condition row, as the released pipeline does.

    Keeps the generated tokens before the first stop token minus one more (a reference off-by-one
    the weights were used with); with no stop token the last two are dropped. CoT rows attend to
    their whole prompt, left padding included; every row is right-aligned, left-filled with
    ``<|im_end|>`` (attention 0) and gets a final ``<img>``.
    """
    rows, length = input_ids.shape
    steps = reasoning_ids.shape[1]
    ends = []
    for b in range(n):
        out = reasoning_ids[b]
        stop_eos = (out == im_end_id).nonzero()
        stop_img = (out == img_id).nonzero()
        q = int(stop_eos[0]) if len(stop_eos) else steps - 1
        r = int(stop_img[0]) if len(stop_img) else steps - 1
        ends.append(min(q, r) + length - 1)
    # The reference needs width ≥ L and crashes when a CoT stops at once; pad instead.
    width = max(max(ends), length)
    ids = torch.full((rows, width + 1), im_end_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros((rows, width + 1), dtype=attention_mask.dtype, device=attention_mask.device)
    for b in range(n):
        sequence = torch.cat([input_ids[b], reasoning_ids[b].to(input_ids.device)])[: ends[b]]
        ids[b, width - ends[b] : width] = sequence
        mask[b, width - ends[b] : width] = 1
    ids[n:, width - length : width] = input_ids[n:]
    mask[n:, width - length : width] = attention_mask[n:]
    ids[:, width] = img_id
    mask[:, width] = 1
    return ids, mask
