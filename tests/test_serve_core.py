"""The core additions the servers rest on: generate_batch, text streaming, timestep_trunc/flow_shift,
encoded-bytes images and Reasoning (de)serialisation, in-process on the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from serving import FOX, png_claiming

from internvl_u_core import GenerationCancelled, InvalidInputError, InvalidInputTypeError, Reasoning
from internvl_u_core import validation as check


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_generate_batch_equals_lone_calls_bit_for_bit(tiny_pipe):
    prompts = ["a fox", "two cats on a very long and winding road by the sea at night", "x"]
    seeds = [1, 2, 3]
    latents = []
    batched = tiny_pipe.generate_batch(prompts, seeds, width=32, height=48, steps=3,
                                       callback=lambda s, t, x: latents.append(x.clone()))
    alone = []
    for prompt, seed in zip(prompts, seeds):
        final = []
        alone += tiny_pipe.generate(prompt, width=32, height=48, steps=3, seed=seed,
                                    callback=lambda s, t, x, final=final: final.append(x.clone()))
        alone_latents = final[-1]
        assert torch.equal(alone_latents[0], latents[-1][len(alone) - 1])
    assert same(batched, alone)


def test_generate_batch_edits_with_different_inputs_and_reasonings(tiny_pipe):
    fox = Image.open(FOX).convert("RGB")
    inputs = [[fox], [fox.resize((40, 70)), Image.new("RGB", (30, 30), (9, 99, 199))]]
    edits = tiny_pipe.generate_batch(["blue", "merge them"], [4, 5], images=inputs, width=40, height=40, steps=2)
    assert same(edits, [tiny_pipe.edit(inputs[0], "blue", width=40, height=40, steps=2, seed=4)[0],
                        tiny_pipe.edit(inputs[1], "merge them", width=40, height=40, steps=2, seed=5)[0]])
    thoughts = [tiny_pipe.reason(p, max_new_tokens=5) for p in ("a boat", "a bird")]
    drawn = tiny_pipe.generate_batch(["a boat", "a bird"], [6, 7], reasonings=thoughts, width=32, steps=2)
    assert same(drawn, [tiny_pipe.generate(p, width=32, steps=2, seed=s, reasoning=r)[0]
                        for p, s, r in zip(("a boat", "a bird"), (6, 7), thoughts)])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompts": ["a", "b"], "seeds": [1]}, "seeds"),
    ({"prompts": ["a", "b"], "seeds": [1, 2], "images": [[Image.new("RGB", (8, 8))], []]}, "images"),
    ({"prompts": ["a", "b"], "seeds": [1, 2], "reasonings": [Reasoning("t", (1,), "a", 0), None]}, "reasonings"),
    ({"prompts": ["a", "b"], "seeds": [1, 2],
      "images": [[Image.new("RGB", (20, 20))], [Image.new("RGB", (30, 20))]]}, "width/height"),
    ({"prompts": [], "seeds": []}, "prompts"),
])
def test_generate_batch_refuses_what_cannot_share_a_pass(tiny_pipe, kwargs, message):
    with pytest.raises((InvalidInputError, InvalidInputTypeError), match=message):
        tiny_pipe.generate_batch(kwargs.pop("prompts"), kwargs.pop("seeds"), steps=1, **kwargs)


def test_text_callback_streams_the_answer(tiny_pipe):
    texts = []
    answer = tiny_pipe.understand(None, "Tell me more", max_new_tokens=12, text_callback=texts.append)
    assert texts[-1] == answer and len(texts) >= 1
    beams = []
    answer = tiny_pipe.understand(None, "Tell me more", max_new_tokens=6, num_beams=2, text_callback=beams.append)
    assert beams == [answer]
    with pytest.raises(GenerationCancelled):
        tiny_pipe.reason("stop early", max_new_tokens=50, min_new_tokens=50,
                         text_callback=lambda text: False)


def test_timestep_trunc_and_flow_shift(tiny_pipe):
    def draw(**kwargs):
        return tiny_pipe.generate("a fox", width=32, height=32, steps=3, seed=1, **kwargs)

    default = draw()
    assert same(default, draw(timestep_trunc=930, flow_shift=3.0))
    assert not same(default, draw(flow_shift=1.5))
    with pytest.raises(InvalidInputError, match="flow_shift"):
        draw(flow_shift=0)
    with pytest.raises(InvalidInputError, match="timestep_trunc"):
        draw(timestep_trunc=float("inf"))


def test_renormalisation_follows_timestep_trunc():
    from internvl_u_core.sampling import combine_guidance

    uncond = torch.zeros(1, 4, 2, 2)
    part, full = torch.full_like(uncond, 3.0), torch.full_like(uncond, 9.0)  # differences with norms > 1

    def guided(timestep, **kwargs):
        return combine_guidance(full, part, uncond, timestep, 4.5, 2.0, **kwargs)

    plain = uncond + 2.0 * (part - uncond) + 4.5 * (full - part)
    assert torch.equal(guided(500), plain)  # late steps: never renormalised
    assert not torch.equal(guided(999), plain)  # early steps: above 930
    assert torch.equal(guided(999, renorm_above=0), plain)  # <= 0: off, as vLLM-Omni's timestep_trunc
    assert torch.equal(guided(999, renorm_above=999), plain)  # not above its own timestep


def test_images_as_encoded_bytes(tiny_pipe):
    data = open(FOX, "rb").read()
    assert np.array_equal(np.asarray(check.load_image(data, "image")), np.asarray(check.load_image(FOX, "image")))
    assert tiny_pipe.understand(data, "What?", max_new_tokens=4) == tiny_pipe.understand(FOX, "What?", max_new_tokens=4)
    with pytest.raises(InvalidInputError, match="is 100×100 pixels, more than the 1,000 allowed"):
        check.load_image(png_claiming(100, 100), "image", check.Limits(max_input_file_pixels=1000))
    with pytest.raises(InvalidInputError, match="too large to open safely"):  # Pillow's own bomb guard
        check.load_image(png_claiming(30000, 30000), "image")
    with pytest.raises(InvalidInputError, match="cannot read"):
        check.load_image(b"not an image", "image")


def test_reasoning_round_trips_and_is_checked(tiny_pipe):
    reasoning = tiny_pipe.reason("a kite", max_new_tokens=4)
    assert Reasoning.from_dict(reasoning.to_dict()) == reasoning
    with pytest.raises(InvalidInputTypeError, match="reasoning.token_ids"):
        Reasoning.from_dict({"text": "t", "token_ids": ["1"], "prompt": "p"})
    with pytest.raises(InvalidInputError, match="reasoning.num_images"):
        Reasoning.from_dict({"text": "t", "token_ids": [1], "num_images": -1})
    outside = Reasoning("t", (10**9,), "a kite", 0)
    with pytest.raises(InvalidInputError, match="reasoning.token_ids holds ids outside"):
        tiny_pipe.generate("a kite", width=32, steps=1, reasoning=outside)


def test_check_request_refuses_what_the_call_would_and_nothing_more(tiny_pipe):
    """The servers' admission check: the same prompt-length bound as a real call, and the reasoning checks."""
    source = Image.open(FOX).convert("RGB")
    rows = tiny_pipe.processor(["<image> make it blue"], [[source]], "image", None, height=32, width=32)
    length = rows.input_ids.shape[1]
    before = tiny_pipe.limits.max_prompt_tokens
    try:
        tiny_pipe.limits.max_prompt_tokens = length
        tiny_pipe.check_request("<image> make it blue", 1)
        tiny_pipe.limits.max_prompt_tokens = length - 1
        with pytest.raises(InvalidInputError, match="^prompt is"):
            tiny_pipe.check_request("<image> make it blue", 1)
        with pytest.raises(InvalidInputError, match="^prompt is"):
            tiny_pipe.edit(source, "<image> make it blue", width=32, height=32, steps=1, seed=1)
    finally:
        tiny_pipe.limits.max_prompt_tokens = before
    with pytest.raises(InvalidInputError, match="^reasoning was made for 1"):
        tiny_pipe.check_request("x", 0, reasoning=Reasoning("t", (1,), "x", num_images=1))
    with pytest.raises(InvalidInputError, match="^reasoning.token_ids"):
        tiny_pipe.check_request("x", 0, reasoning=Reasoning("t", (10**9,), "x", num_images=0))
    with pytest.raises(InvalidInputError, match="image slots"):
        tiny_pipe.check_request("<image> <image>", 1)


def test_flow_shift_range_edges_run_and_beyond_is_refused(tiny_pipe):
    """At flow_shift 100 and 20 steps the first timestep repeats after rounding; the solver still starts at
    step 0 (it used to start one in and run past its last sigma: IndexError, a 500 on the server)."""
    assert len(tiny_pipe.generate("x", width=16, height=16, steps=20, seed=1, flow_shift=100.0)) == 1
    for shift in (1e30, 100.5, 0.0, 0.001):
        with pytest.raises(InvalidInputError, match="flow_shift .* out of range"):
            tiny_pipe.generate("x", width=16, height=16, steps=1, flow_shift=shift)
    with pytest.raises(InvalidInputError, match="timestep_trunc .* out of range"):
        tiny_pipe.generate("x", width=16, height=16, steps=1, timestep_trunc=1e300)
