"""Property-based fuzzing of the processor and the validation layer (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CHECKPOINT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_u_core import InternVLUError
from internvl_u_core import validation as check
from internvl_u_core.processor import IMAGE_SLOT, InternVLUProcessor, normalize_prompt, smart_resize

PROCESSOR = InternVLUProcessor.from_folder(TINY_CHECKPOINT / "processor")
TOKENS = {name: PROCESSOR.token_id(name) for name in ("<IMG_CONTEXT>", "<|im_start|>", "<img>")}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

words = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
prompt_text = st.lists(st.one_of(words, st.just(IMAGE_SLOT), st.sampled_from([" ", "\n", "。", "!", "<img>", "好"])),
                       max_size=6).map("".join)
small_image = st.builds(
    lambda w, h, c, mode: Image.new("RGB", (w, h), c).convert(mode),
    st.integers(1, 70), st.integers(1, 70), st.tuples(*[st.integers(0, 255)] * 3),
    st.sampled_from(["RGB", "RGBA", "L", "P", "CMYK"]),
)


@FAST
@given(
    prompts=st.lists(prompt_text, min_size=1, max_size=3),
    image_counts=st.lists(st.integers(0, 2), min_size=3, max_size=3),
    mode=st.sampled_from(["text", "image", "text_image"]),
    image=small_image,
    size=st.tuples(st.integers(1, 200), st.integers(1, 200)),
)
def test_processor_batches_are_consistent(prompts, image_counts, mode, image, size):
    counts = image_counts[: len(prompts)]
    if mode != "text" and any(counts):
        counts = [max(1, c) for c in counts]  # generation batches are all-edit or all-t2i
    images = [[check.to_rgb(image)] * k for k in counts]
    try:
        batch = PROCESSOR(prompts, images, mode, height=size[0], width=size[1])
    except InternVLUError as error:
        assert "image slots" in str(error) or "pixels" in str(error) or "aspect ratio" in str(error)
        return
    n, total = len(prompts), sum(counts)
    rows = n if mode == "text" else 3 * n
    assert batch.input_ids.shape[0] == rows == batch.attention_mask.shape[0]
    for mask in batch.attention_mask:  # left padding: zeros then ones
        ones = int(mask.sum())
        assert torch.equal(mask[-ones:], torch.ones(ones, dtype=mask.dtype)) and not mask[: len(mask) - ones].any()
    copies = 1 if mode == "text" else 2
    context = int((batch.input_ids == TOKENS["<IMG_CONTEXT>"]).sum())
    assert context == PROCESSOR.image_seq_length * total * copies
    if total:
        assert batch.pixel_values.shape[0] == total * copies and batch.pixel_values.dtype == torch.bfloat16
    for row, mask in zip(batch.input_ids, batch.attention_mask):
        assert int((row[mask.bool()] == TOKENS["<|im_start|>"]).sum()) >= 3
    if mode != "text":
        flags = batch.generation_flags
        assert int(flags.sum()) == 3 * n and len(flags) == len(batch.image_grid_thw_gen) == 3 * n + 2 * total
        h_gen, w_gen = batch.gen_size
        assert h_gen % 16 == 0 and w_gen % 16 == 0 and h_gen >= 16 and w_gen >= 16
        if total:
            assert batch.pixel_values_gen.shape[0] == 2 * total


@FAST
@given(text=prompt_text, k=st.integers(0, 3))
def test_prompt_normalisation(text, k):
    out = normalize_prompt(text, k)
    given = text.count(IMAGE_SLOT)
    assert out.count(IMAGE_SLOT) == max(given, k)  # missing slots are added in front; none is removed
    if given < k:
        assert out.startswith(IMAGE_SLOT)
    assert out == out.strip()
    if out:
        assert out[-1] in ".!?,:;"


@FAST
@given(h=st.integers(16, 5000), w=st.integers(16, 5000))
def test_smart_resize_stays_on_grid_and_budget(h, w):
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(InternVLUError):
            smart_resize(h, w, 16, 512 * 512, 1024 * 1024)
        return
    rh, rw = smart_resize(h, w, 16, 512 * 512, 1024 * 1024)
    assert rh % 16 == 0 and rw % 16 == 0
    assert rh * rw <= 1024 * 1024


numbers = st.one_of(st.integers(-10, 10_000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                    st.none(), st.booleans())


@FAST
@given(height=numbers, width=numbers, steps=numbers, scale=numbers)
def test_validation_never_raises_foreign_errors(height, width, steps, scale):
    limits = check.DEFAULT_LIMITS
    for call in (lambda: check.image_size(height, width), lambda: check.steps(steps),
                 lambda: check.guidance_scale(scale, "all_cfg_scale")):
        try:
            result = call()
        except InternVLUError as error:
            assert isinstance(error, (ValueError, TypeError)) and str(error)
            continue
        if isinstance(result, tuple):
            assert all(limits.min_side <= v <= limits.max_side for v in result)
        elif isinstance(result, float):
            assert 0 <= result <= limits.max_guidance_scale
        else:
            assert 1 <= result <= limits.max_steps


@FAST
@given(prompt=st.one_of(prompt_text, st.lists(prompt_text, max_size=3), st.integers(), st.none()),
       image=st.one_of(st.none(), small_image, st.lists(st.one_of(small_image, st.none()), max_size=3),
                       st.lists(st.lists(small_image, max_size=2), max_size=3)))
def test_prompt_and_image_nesting_is_resolved_or_refused(prompt, image):
    try:
        prompts, images = check.prompts_and_images(prompt, image)
    except InternVLUError as error:
        assert isinstance(error, (ValueError, TypeError)) and str(error)
        return
    assert len(prompts) == len(images) >= 1
    assert all(isinstance(i, Image.Image) and i.mode == "RGB" for imgs in images for i in imgs)
