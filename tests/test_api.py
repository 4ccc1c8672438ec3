"""Public API behaviour beyond the reference: any size, several images, cancel and re-run, composition."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import NO_GPU_REASON, load_inputs
from PIL import Image

from internvl_u_core import GenerationCancelled, InvalidInputError, Reasoning

FOX = "img_fox_80x60.png"
LAKE = "img_lake_70x70.png"


def _pixels(images):
    return [np.asarray(i) for i in images]


@pytest.mark.parametrize("width,height", [(16, 16), (17, 33), (100, 23), (72, 100), (64, 48)])
def test_any_size_from_the_minimum_works(tiny_pipe, width, height):
    images = tiny_pipe.generate("a fox", width=width, height=height, steps=2, seed=1)
    assert [i.size for i in images] == [(width, height)]


@pytest.mark.parametrize("width,height,name", [(15, 32, "width = 15"), (32, 1, "height = 1")])
def test_sizes_below_the_minimum_are_refused(tiny_pipe, width, height, name):
    with pytest.raises(InvalidInputError, match=f"{name} is out of range; allowed 16…"):
        tiny_pipe.generate("a fox", width=width, height=height, steps=1)


def test_several_images_per_prompt_first_equals_single(tiny_pipe):
    many = tiny_pipe.generate("a fox", width=64, height=48, steps=2, seed=1, num_images=3)
    single = tiny_pipe.generate("a fox", width=64, height=48, steps=2, seed=1)
    assert len(many) == 3
    assert np.array_equal(_pixels(many)[0], _pixels(single)[0])
    assert not np.array_equal(_pixels(many)[0], _pixels(many)[1])


def test_edit_defaults_to_input_size_and_takes_several_images(tiny_pipe):
    fox = load_inputs("internvlu-tiny", FOX)
    lake = load_inputs("internvlu-tiny", LAKE)
    assert tiny_pipe.edit(fox, "make it blue", steps=2, seed=3)[0].size == fox.size
    both = tiny_pipe.edit([fox, lake], "put the fox by the lake", steps=2, seed=3, width=48, height=40)
    assert [i.size for i in both] == [(48, 40)]
    assert not np.array_equal(
        _pixels(both)[0], _pixels(tiny_pipe.edit([fox], "put the fox by the lake", steps=2, seed=3, width=48, height=40))[0]
    )


def test_reference_call_with_batch_of_edits_and_copies(tiny_pipe):
    fox = load_inputs("internvlu-tiny", FOX)
    lake = load_inputs("internvlu-tiny", LAKE)
    out = tiny_pipe(["a", "b"], image=[fox, lake], generation_mode="image", num_inference_steps=2, height=32,
                    width=32, num_images_per_prompt=2)
    assert len(out.images) == 4


def test_mixed_edit_and_generation_batch_is_refused(tiny_pipe):
    fox = load_inputs("internvlu-tiny", FOX)
    with pytest.raises(InvalidInputError, match="cannot mix"):
        tiny_pipe(["a", "b"], image=[fox, None], generation_mode="image", num_inference_steps=2)


def test_cancel_then_rerun_gives_identical_image(tiny_pipe):
    reference = tiny_pipe.generate("a lighthouse", width=32, height=32, steps=4, seed=9)
    steps = []

    def stop_at_two(step, total, latents):
        steps.append((step, total, tuple(latents.shape)))
        return step < 2

    with pytest.raises(GenerationCancelled):
        tiny_pipe.generate("a lighthouse", width=32, height=32, steps=4, seed=9, callback=stop_at_two)
    assert steps == [(1, 4, (1, 4, 4, 4)), (2, 4, (1, 4, 4, 4))]
    again = tiny_pipe.generate("a lighthouse", width=32, height=32, steps=4, seed=9)
    assert np.array_equal(_pixels(reference)[0], _pixels(again)[0])


def test_exception_in_callback_propagates_and_pipeline_recovers(tiny_pipe):
    class Interrupted(Exception):
        pass

    def interrupt(step, total, latents):
        raise Interrupted

    with pytest.raises(Interrupted):
        tiny_pipe.generate("a boat", width=32, height=32, steps=3, seed=2, callback=interrupt)
    first = tiny_pipe.generate("a boat", width=32, height=32, steps=3, seed=2)
    assert np.array_equal(_pixels(first)[0], _pixels(tiny_pipe.generate("a boat", width=32, height=32, steps=3, seed=2))[0])


def test_reason_then_generate_equals_text_image_mode(tiny_pipe):
    prompt = "生成一张展现希望正在生长的画面"
    reasoning = tiny_pipe.reason(prompt, max_new_tokens=12)
    assert isinstance(reasoning, Reasoning)
    composed = tiny_pipe.generate(prompt, reasoning=reasoning, width=64, height=64, steps=4,
                                  generator=torch.Generator().manual_seed(5))
    direct = tiny_pipe(prompt, generation_mode="text_image", max_new_tokens=12, num_inference_steps=4, height=64,
                       width=64, generator=torch.Generator().manual_seed(5))
    assert list(reasoning.token_ids) == direct.generate_output[0].tolist()
    assert np.array_equal(_pixels(composed)[0], _pixels(direct.images)[0])


def test_reason_then_edit_equals_text_image_edit(tiny_pipe):
    fox = load_inputs("internvlu-tiny", FOX)
    reasoning = tiny_pipe.reason("make it night", fox, max_new_tokens=6)
    composed = tiny_pipe.edit(fox, "make it night", reasoning=reasoning, width=32, height=32, steps=2, seed=4)
    direct = tiny_pipe("make it night", fox, generation_mode="text_image", max_new_tokens=6, num_inference_steps=2,
                       height=32, width=32, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(_pixels(composed)[0], _pixels(direct.images)[0])
    with pytest.raises(InvalidInputError, match="reasoning was made for 1 input image"):
        tiny_pipe.generate("make it night", reasoning=reasoning, steps=1)


def test_chain_of_thought_stopping_at_once_still_draws(tiny_pipe):
    prompt = "a tree"
    stop_now = Reasoning(text="", token_ids=(tiny_pipe.im_end_id,), prompt=prompt, num_images=0)
    images = tiny_pipe.generate(prompt, reasoning=stop_now, width=32, height=32, steps=2, seed=0)
    assert images[0].size == (32, 32)


def test_preview_and_components(tiny_pipe):
    seen = []
    tiny_pipe.generate("a cat", width=32, height=32, steps=2, seed=0,
                       callback=lambda s, t, lat: seen.append(tiny_pipe.decode_latents_preview(lat)))
    assert len(seen) == 2 and seen[0].mode == "RGB" and seen[0].size == (4, 4)
    assert set(tiny_pipe.components) == {"vlm", "generation_decoder", "vae"}
    assert tiny_pipe.model_size_bytes() > 0
    assert tiny_pipe.device.type == "cpu" and tiny_pipe.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cpu_offload_without_cuda_is_refused_clearly(tiny_pipe):
    with pytest.raises(InvalidInputError, match=rf"enable_model_cpu_offload\(\) .*{NO_GPU_REASON}"):
        tiny_pipe.enable_model_cpu_offload()
    with pytest.raises(InvalidInputError, match="nothing to offload to"):
        tiny_pipe.enable_model_cpu_offload("cpu")
    assert tiny_pipe.device.type == "cpu"  # nothing changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading needs a CUDA GPU")
def test_component_offload_moves_parts_and_gives_identical_results():
    from conftest import TINY_CHECKPOINT

    from internvl_u_core import InternVLUPipeline

    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype=torch.float32, device="cuda")
    fox = load_inputs("internvlu-tiny", FOX)
    on_gpu = _pixels(pipe.edit(fox, "make it blue", steps=2, seed=3, width=32, height=32))[0]
    pipe.enable_model_cpu_offload()
    assert all(next(m.parameters()).device.type == "cpu" for m in pipe.components.values())
    offloaded = _pixels(pipe.edit(fox, "make it blue", steps=2, seed=3, width=32, height=32))[0]
    assert np.array_equal(on_gpu, offloaded)
    # Only the part that ran last (the VAE) is left on the GPU; the others went back to the CPU.
    assert next(pipe.vlm.parameters()).device.type == "cpu"
    assert next(pipe.generation_decoder.parameters()).device.type == "cpu"
    assert next(pipe.vae.parameters()).device.type == "cuda"


def test_generator_list_must_match_the_batch(tiny_pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = tiny_pipe(["a", "b"], generation_mode="image", num_inference_steps=1, height=32, width=32,
                    generator=generators)
    assert len(out.images) == 2
    with pytest.raises(InvalidInputError, match="generator"):
        tiny_pipe(["a", "b", "c"], generation_mode="image", num_inference_steps=1, generator=generators)


def test_an_edit_of_a_photo_larger_than_the_limits_is_drawn_at_the_largest_size_allowed(tiny_pipe):
    """No size given: the first image's, fitted to max_side/max_pixels (not refused as a width nobody passed)."""
    photo = Image.new("RGB", (100, 60), (200, 120, 40))
    limits = tiny_pipe.limits
    try:
        tiny_pipe.limits = dataclasses.replace(limits, max_side=48, max_pixels=48 * 48)
        (edited,) = tiny_pipe.edit(photo, "make it blue", steps=1, seed=0)
        assert edited.size == (48, 28)
        with pytest.raises(InvalidInputError, match="width = 64 is out of range"):
            tiny_pipe.edit(photo, "make it blue", steps=1, seed=0, width=64)
    finally:
        tiny_pipe.limits = limits


def test_pil_s_decompression_bomb_warning_does_not_leak(tmp_path, monkeypatch):
    """Our own bound (max_input_file_pixels) decides about huge files; PIL's warning would only be noise."""
    from internvl_u_core import validation

    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 60,000 pixels: above PIL's warning level
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert validation.load_image(str(path), "image").size == (300, 200)
