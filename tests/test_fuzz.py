"""Property-based fuzzing of the processor and the validation layer (hypothesis)."""

from __future__ import annotations

import json

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


huge_numbers = st.one_of(numbers, st.integers(min_value=10**18, max_value=10**4000), st.integers(max_value=-(10**30)),
                         st.sampled_from([1e30, -1e30, 1e308, 5e-324, -0.0]))


@FAST
@given(shift=huge_numbers, trunc=huge_numbers, seed=huge_numbers)
def test_numeric_knobs_have_ranges_and_never_raise_foreign_errors(shift, trunc, seed):
    limits = check.DEFAULT_LIMITS
    for call, low, high in ((lambda: check.flow_shift(shift), limits.min_flow_shift, limits.max_flow_shift),
                            (lambda: check.timestep_trunc(trunc), -limits.max_timestep_trunc, limits.max_timestep_trunc),
                            (lambda: check.optional_seed(seed), 0, limits.max_seed)):
        try:
            result = call()
        except InternVLUError as error:
            assert isinstance(error, (ValueError, TypeError)) and len(str(error)) < 300
            continue
        assert result is None or low <= result <= high


# ----------------------------------------------------------------------------------------------
# The HTTP protocol, in-process (hypothesis against the ASGI app with the real engine and tiny model)
# ----------------------------------------------------------------------------------------------
hostile_values = st.one_of(
    huge_numbers, st.text(max_size=30), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=6)), max_size=3),
    st.integers(0, 30).map(lambda depth: [[]] if depth == 0 else eval("[" * depth + "]" * depth)),  # noqa: S307
    st.sampled_from(["32x32", "auto", "0x0", "1x99999", "png", "jpeg", "b64_json", "url", "data:image/png;base64,AAAA",
                     {"text": "t", "token_ids": [1, 2], "prompt": "x", "num_images": 0}]),
)
IMAGE_FIELDS = ["prompt", "n", "size", "width", "height", "seed", "num_inference_steps", "all_cfg_scale",
                "part_cfg_scale", "timestep_trunc", "flow_shift", "reasoning", "think", "stream", "output_format",
                "output_compression", "partial_images", "system_prompt", "extra_params", "model", "max_tokens",
                "response_format", "negative_prompt"]
CHAT_FIELDS = ["messages", "modalities", "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p",
               "seed", "n", "stream", "think", "num_beams", "do_sample", "width", "height", "reasoning", "model"]
content_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": hostile_values}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": hostile_values})}),
    hostile_values), max_size=3)


@pytest.fixture(scope="module")
def asgi_client(tiny_pipe):
    """The server's app over the real engine; settings' limits keep every accepted request to a blink."""
    from dataclasses import replace

    from starlette.testclient import TestClient

    from internvl_u_serve.http.app import OpenAIServer, allowed_hosts_for
    from internvl_u_serve.http.engine import Engine
    from internvl_u_serve.http.protocol import ServerSettings

    limits = replace(tiny_pipe.limits, max_steps=2, max_side=48, max_pixels=48 * 48, max_new_tokens=3,
                     max_output_images=2, max_images_per_prompt=2, max_input_pixels=64 * 64)
    engine = Engine(tiny_pipe, max_queue=4)
    server = OpenAIServer(engine, ServerSettings(model_name="tiny", limits=limits), max_body_bytes=1 << 20,
                          allowed_hosts=allowed_hosts_for("127.0.0.1"))
    with TestClient(server.app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client
    engine.close()


def assert_answered_in_openai_shape(answer) -> None:
    assert answer.status_code < 500, answer.text
    assert "Traceback" not in answer.text and str(TINY_CHECKPOINT.parent.parent) not in answer.text
    if answer.status_code >= 400:
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        assert len(error["message"]) < 1000


FUZZ = settings(max_examples=80, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(overrides=st.dictionaries(st.sampled_from(IMAGE_FIELDS), hostile_values, max_size=4))
def test_images_api_answers_any_fields_without_a_5xx(asgi_client, overrides):
    body = {"prompt": "x", "size": "32x32", "num_inference_steps": 1, "think": False, "max_tokens": 2, **overrides}
    assert_answered_in_openai_shape(asgi_client.post("/v1/images/generations", content=json.dumps(body),
                                                     headers={"Content-Type": "application/json"}))


@FUZZ
@given(overrides=st.dictionaries(st.sampled_from(CHAT_FIELDS), hostile_values, max_size=4), parts=content_parts,
       role=st.sampled_from(["user", "system", "assistant", 7]))
def test_chat_answers_any_fields_without_a_5xx(asgi_client, overrides, parts, role):
    body = {"messages": [{"role": role, "content": parts or "hi"}], "max_tokens": 2, "width": 32, "height": 32,
            "num_inference_steps": 1, **overrides}
    assert_answered_in_openai_shape(asgi_client.post("/v1/chat/completions", content=json.dumps(body),
                                                     headers={"Content-Type": "application/json"}))


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(IMAGE_FIELDS), st.text(max_size=12), max_size=5),
       upload=st.one_of(st.binary(max_size=64), st.just(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)))
def test_edits_answer_any_form_without_a_5xx(asgi_client, fields, upload):
    answer = asgi_client.post("/v1/images/edits", data={"prompt": "x", "num_inference_steps": "1", **fields},
                              files={"image": ("x.png", upload, "image/png")})
    assert_answered_in_openai_shape(answer)


@FUZZ
@given(body=st.binary(max_size=200), kind=st.sampled_from(["application/json", "multipart/form-data; boundary=x"]))
def test_raw_bodies_get_no_5xx(asgi_client, body, kind):
    for path in ("/v1/chat/completions", "/v1/images/generations", "/v1/images/edits"):
        assert_answered_in_openai_shape(asgi_client.post(path, content=body, headers={"Content-Type": kind}))
