"""Understanding and chain-of-thought text reproduce the reference fixtures exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, call_kwargs, expected_tensors, fixture_cases, get_pipeline, load_inputs

from internvl_u_core import validation

TEXT_CASES = fixture_cases(lambda mode: mode == "text")


@pytest.mark.parametrize("set_name,case", TEXT_CASES)
def test_processor_outputs_exact(set_name, case):
    pipe = get_pipeline(set_name)
    expected = expected_tensors(set_name, case)
    prompts, images = validation.prompts_and_images(
        case["inputs"]["prompt"], load_inputs(set_name, case["inputs"]["image"])
    )
    batch = pipe.processor(prompts, images, "text", case["call_kwargs"].get("system_prompt"))
    assert torch.equal(batch.input_ids, expected["processor.0.input_ids"])
    assert torch.equal(batch.attention_mask, expected["processor.0.attention_mask"])
    if "processor.0.pixel_values" in expected:
        assert batch.pixel_values.dtype == torch.bfloat16
        assert torch.equal(batch.pixel_values, expected["processor.0.pixel_values"])
    else:
        assert batch.pixel_values is None


@pytest.mark.parametrize("set_name,case", TEXT_CASES)
def test_vision_features_and_prefill_logits(set_name, case):
    pipe = get_pipeline(set_name)
    expected = expected_tensors(set_name, case)
    prompts, images = validation.prompts_and_images(
        case["inputs"]["prompt"], load_inputs(set_name, case["inputs"]["image"])
    )
    batch = pipe.processor(prompts, images, "text")
    with torch.inference_mode():
        if batch.pixel_values is not None:
            features = pipe.vlm.extract_feature(batch.pixel_values.float())
            assert_close(features, expected["vision.features_after_mlp1.0"], name="features_after_mlp1")
        embeds = pipe.vlm.embed_prompt(batch.input_ids, batch.pixel_values)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = pipe.vlm.language_model(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions
        ).logits[:, -1]
    assert_close(logits, expected["llm.prefill_last_logits.0"], atol=1e-3, name="prefill logits")


@pytest.mark.parametrize("set_name,case", TEXT_CASES)
def test_generated_tokens_and_text_exact(set_name, case):
    pipe = get_pipeline(set_name)
    out = pipe(case["inputs"]["prompt"], load_inputs(set_name, case["inputs"]["image"]), "text", **call_kwargs(case))
    assert out.generate_output.tolist() == case["expected"]["generated_token_ids"]
    assert out.text == case["expected"]["decoded_text_skip_special"]
    raw = pipe.processor.tokenizer.batch_decode(out.generate_output, skip_special_tokens=False)
    assert raw == case["expected"]["decoded_text_raw"]


@pytest.mark.parametrize("set_name,case", fixture_cases(lambda mode: mode == "text_image"))
def test_reason_reproduces_chain_of_thought_tokens(set_name, case):
    pipe = get_pipeline(set_name)
    kwargs = {"max_new_tokens": case["call_kwargs"]["max_new_tokens"]}
    reasoning = pipe.reason(case["inputs"]["prompt"], load_inputs(set_name, case["inputs"]["image"]), **kwargs)
    assert [list(reasoning.token_ids)] == case["expected"]["generated_token_ids"]
    assert reasoning.text == case["expected"]["decoded_text_skip_special"][0]


def test_understand_matches_reference_call(tiny_pipe):
    image = load_inputs("internvlu-tiny", "img_lake_70x70.png")
    answer = tiny_pipe.understand(image, "Count the apples on the table", max_new_tokens=16)
    reference = tiny_pipe("Count the apples on the table", image, "text", max_new_tokens=16)
    assert answer == reference.text[0]


def test_token_callback_sees_each_step_and_can_cancel(tiny_pipe):
    from internvl_u_core import GenerationCancelled

    seen = []
    tiny_pipe.understand(None, "Tell me a story.", max_new_tokens=5, token_callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]
    with pytest.raises(GenerationCancelled):
        tiny_pipe.understand(None, "Tell me a story.", max_new_tokens=5, token_callback=lambda i, n: i < 2)
    again = tiny_pipe.understand(None, "Tell me a story.", max_new_tokens=5)
    assert again == tiny_pipe.understand(None, "Tell me a story.", max_new_tokens=5)


def test_sampling_is_reproducible_with_seed(tiny_pipe):
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 0.9, "seed": 3}
    first = tiny_pipe.understand(None, "Say something.", **kwargs)
    assert first == tiny_pipe.understand(None, "Say something.", **kwargs)


def test_beam_search_runs(tiny_pipe):
    out = tiny_pipe("Tell me a short story about a fox and a river.", None, "text", max_new_tokens=6, num_beams=3)
    assert out.generate_output.shape[0] == 1 and 1 <= out.generate_output.shape[1] <= 6
