"""Every bad input answered clearly and quickly; faults and threads leave the pipeline exact."""

from __future__ import annotations

import math
import socket
import threading

import numpy as np
import pytest
import torch
from conftest import TINY_CHECKPOINT, load_inputs
from PIL import Image

from internvl_u_core import GenerationCancelled, InternVLUError, InternVLUPipeline, InvalidInputError

FOX = "img_fox_80x60.png"


def _fox():
    return load_inputs("internvlu-tiny", FOX)


def _baseline(pipe):
    return np.asarray(pipe.generate("a calm lake", width=32, height=32, steps=2, seed=11)[0])


# (description, call, expected error type, words the message must contain)
BAD_INPUTS = [
    ("80k-token prompt", lambda p: p.understand(None, "word " * 80_000, max_new_tokens=2), ValueError, "characters"),
    ("prompt over the context", lambda p: p.understand(None, "好" * 5000, max_new_tokens=2), ValueError, "context"),
    ("zero width", lambda p: p.generate("x", width=0, height=32, steps=1), ValueError, "width"),
    ("negative height", lambda p: p.generate("x", width=32, height=-5, steps=1), ValueError, "height"),
    ("absurd size", lambda p: p.generate("x", width=100_000, height=100_000, steps=1), ValueError, "allowed 16…4096"),
    ("below the smallest size", lambda p: p.generate("x", width=8, height=32, steps=1), ValueError, "width = 8"),
    ("absurd copies", lambda p: p.generate("x", width=32, height=32, steps=1, num_images=10_000), ValueError,
     "num_images = 10000"),
    ("absurd copies, reference call", lambda p: p("x", generation_mode="image", num_images_per_prompt=10_000),
     ValueError, "num_images_per_prompt = 10000"),
    ("float size", lambda p: p.generate("x", width=32.5, height=32, steps=1), TypeError, "width"),
    ("zero steps", lambda p: p.generate("x", width=32, height=32, steps=0), ValueError, "steps = 0"),
    ("zero steps, reference call", lambda p: p("x", generation_mode="image", num_inference_steps=0), ValueError,
     "num_inference_steps = 0"),
    ("negative guidance", lambda p: p.generate("x", width=32, height=32, steps=1, all_cfg_scale=-1), ValueError,
     "all_cfg_scale = -1"),
    ("NaN guidance", lambda p: p.generate("x", width=32, height=32, steps=1, all_cfg_scale=math.nan), ValueError,
     "all_cfg_scale"),
    ("infinite part guidance", lambda p: p.generate("x", width=32, height=32, steps=1, part_cfg_scale=math.inf),
     ValueError, "part_cfg_scale"),
    ("string guidance", lambda p: p.generate("x", width=32, height=32, steps=1, all_cfg_scale="high"), TypeError,
     "all_cfg_scale"),
    ("unknown mode", lambda p: p("x", generation_mode="video"), ValueError, "generation_mode"),
    ("2 prompts, 3 images", lambda p: p(["a", "b"], image=[_fox(), _fox(), _fox()], generation_mode="image"),
     ValueError, "3 entries"),
    ("one image for two prompts", lambda p: p(["a", "b"], image=_fox(), generation_mode="text"), ValueError,
     "one entry per prompt"),
    ("more slots than images", lambda p: p.understand(_fox(), "<image> and <image>?", max_new_tokens=2), ValueError,
     "image slots"),
    ("image slot in system prompt", lambda p: p.understand(None, "hi", system_prompt="<image>"), ValueError,
     "system_prompt"),
    ("zero max_new_tokens", lambda p: p.understand(None, "hi", max_new_tokens=0), ValueError, "max_new_tokens"),
    ("negative temperature", lambda p: p.understand(None, "hi", do_sample=True, temperature=-1), ValueError,
     "temperature"),
    ("top_p above one", lambda p: p.understand(None, "hi", do_sample=True, top_p=1.5), ValueError, "top_p"),
    ("negative seed", lambda p: p.generate("x", width=32, height=32, steps=1, seed=-1), ValueError, "seed"),
    ("missing image file", lambda p: p.understand("/nonexistent/cat.png", "what?"), ValueError, "does not exist"),
    ("not an image file", lambda p: p.understand(__file__, "what?"), ValueError, "cannot read"),
    ("numpy array image", lambda p: p.understand(np.zeros((8, 8, 3), np.uint8), "what?"), TypeError, "PIL"),
    ("prompt is not text", lambda p: p.generate(42, steps=1), TypeError, "prompt"),
    ("NUL in prompt", lambda p: p.generate("a\x00b", steps=1), ValueError, "NUL"),
    ("edit without image", lambda p: p.edit([], "make it red", steps=1), ValueError, "at least one image"),
    ("too many images", lambda p: p.understand([_fox()] * 17, "what?"), ValueError, "at most 16"),
    ("mixed edit and generation batch", lambda p: p(["a", "b"], image=[_fox(), None], generation_mode="image",
                                                     num_inference_steps=1), ValueError, "cannot mix"),
    ("reasoning of the wrong type", lambda p: p.generate("x", reasoning="think harder", steps=1), ValueError,
     "reasoning"),
    ("bad generator", lambda p: p("x", generation_mode="image", generator=123, num_inference_steps=1), TypeError,
     "generator"),
    ("min tokens above max", lambda p: p("x", max_new_tokens=2, min_new_tokens=5), ValueError, "min_new_tokens"),
]


@pytest.mark.parametrize("description,call,error,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_answered_clearly(tiny_pipe, description, call, error, words):
    before = _baseline(tiny_pipe)
    with pytest.raises(error) as caught:
        call(tiny_pipe)
    assert isinstance(caught.value, InternVLUError), f"{description}: raw {type(caught.value).__name__}"
    assert words.lower() in str(caught.value).lower()
    assert np.array_equal(before, _baseline(tiny_pipe))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "I", "F", "CMYK", "1", "L", "YCbCr"])
def test_images_of_any_mode_work(tiny_pipe, mode):
    rgb = _fox()
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        assert image.mode.startswith("I;16")
    else:
        image = rgb.convert(mode)
    answer = tiny_pipe.understand(image, "what is this?", max_new_tokens=2)
    assert isinstance(answer, str)
    edited = tiny_pipe.edit(image, "make it red", steps=1, seed=0, width=32, height=32)
    assert edited[0].size == (32, 32)


def test_tiny_and_extreme_images(tiny_pipe):
    one = Image.new("RGB", (1, 1), (200, 10, 10))
    assert isinstance(tiny_pipe.understand(one, "what?", max_new_tokens=2), str)
    # The output defaults to the input's size, raised to the smallest size the pipeline draws.
    assert tiny_pipe.edit(one, "bigger", steps=1, seed=0)[0].size == (16, 16)
    strip = Image.new("RGB", (2000, 3), (0, 0, 255))
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        tiny_pipe.edit(strip, "x", steps=1, width=32, height=32)


def test_huge_input_is_downscaled_before_use(tiny_pipe, tmp_path):
    tiny_pipe.limits.max_input_pixels = 100 * 100
    try:
        path = tmp_path / "big.jpg"
        Image.new("RGB", (1600, 1200), (10, 200, 30)).save(path)
        assert isinstance(tiny_pipe.understand(path, "what?", max_new_tokens=2), str)
        from internvl_u_core.validation import load_image

        loaded = load_image(path, "image", tiny_pipe.limits)
        assert loaded.width * loaded.height <= 100 * 100
        assert abs(loaded.width / loaded.height - 4 / 3) < 0.05
    finally:
        tiny_pipe.limits.max_input_pixels = type(tiny_pipe.limits)().max_input_pixels


def test_image_file_claiming_absurd_size_is_refused_before_decoding(tiny_pipe, tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)
    with pytest.raises(InvalidInputError, match="downscale it first"):
        tiny_pipe.understand(path, "what?")


def test_limits_are_configurable(tiny_pipe):
    tiny_pipe.limits.max_pixels = 32 * 32
    try:
        with pytest.raises(InvalidInputError, match="pixel budget"):
            tiny_pipe.generate("x", width=64, height=64, steps=1)
        assert tiny_pipe.generate("x", width=32, height=32, steps=1, seed=0)[0].size == (32, 32)
    finally:
        tiny_pipe.limits.max_pixels = type(tiny_pipe.limits)().max_pixels


def test_fault_during_decode_then_identical_rerun(tiny_pipe, monkeypatch):
    before = _baseline(tiny_pipe)
    real_decode = tiny_pipe.codec.decode

    def broken(latents):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(tiny_pipe.codec, "decode", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        _baseline(tiny_pipe)
    monkeypatch.setattr(tiny_pipe.codec, "decode", real_decode)
    assert np.array_equal(before, _baseline(tiny_pipe))


def test_keyboard_interrupt_mid_sampling_then_identical_rerun(tiny_pipe):
    before = _baseline(tiny_pipe)

    def interrupt(step, total, latents):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_pipe.generate("a calm lake", width=32, height=32, steps=2, seed=11, callback=interrupt)
    with pytest.raises(GenerationCancelled):
        tiny_pipe.understand(None, "hi", max_new_tokens=4, token_callback=lambda i, n: False)
    assert np.array_equal(before, _baseline(tiny_pipe))


def test_threads_get_their_own_results(tiny_pipe):
    jobs = [("generate", seed) for seed in range(4)] + [("understand", q) for q in ("hi", "tell me", "why?")]

    def run(job):
        kind, arg = job
        if kind == "generate":
            return np.asarray(tiny_pipe.generate("a fox", width=32, height=32, steps=2, seed=arg)[0])
        return tiny_pipe.understand(None, arg, max_new_tokens=4)

    sequential = [run(job) for job in jobs]
    results: list = [None] * len(jobs)

    def worker(i):
        results[i] = run(jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for expected, got in zip(sequential, results):
        if isinstance(expected, np.ndarray):
            assert np.array_equal(expected, got)
        else:
            assert expected == got


def test_local_loading_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during a local load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype=torch.float32, device="cpu")
    assert pipe.understand(None, "hi", max_new_tokens=2) is not None


def test_atomic_writes_leave_no_temporary_file_behind(tmp_path, monkeypatch):
    from internvl_u_core import files

    store = files.ImageStore(tmp_path, max_input_pixels=10_000)
    saved = store.save(Image.new("RGB", (4, 4), (1, 2, 3)))
    assert saved.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        saved.path.name]
    synced = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr(files.os, "replace", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        store.save(Image.new("RGB", (4, 4)))
    assert synced and sorted(p.name for p in tmp_path.iterdir()) == [saved.path.name]
