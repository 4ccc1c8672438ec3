"""The VAE: the single-frame fast path, its fallback to diffusers' own encode/decode, and tiling."""

from __future__ import annotations

import copy

import numpy as np
import torch
from conftest import assert_close, load_inputs

from internvl_u_core.sampling import SingleFrameVAE, fast_path_problem, pixels_to_pil

FOX = "img_fox_80x60.png"


def _images(pipe) -> list[np.ndarray]:
    fox = load_inputs("internvlu-tiny", FOX)
    edited = pipe.edit(fox, "make it blue", steps=2, seed=3, width=64, height=48)
    drawn = pipe.generate("a cat", steps=2, seed=3, width=96, height=64)
    return [np.asarray(image, dtype=np.int16) for image in (*edited, *drawn)]


def test_fallback_gives_the_same_latents_and_pixels(tiny_pipe):
    codec = tiny_pipe.codec
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fast_latents, fast_pixels = codec.encode(pixels), codec.decode(codec.encode(pixels)[:1])
    fast_images = _images(tiny_pipe)
    codec.frames.fast_path = False
    try:
        slow_latents, slow_pixels = codec.encode(pixels), codec.decode(codec.encode(pixels)[:1])
        slow_images = _images(tiny_pipe)
    finally:
        codec.frames.fast_path = True
    # 2-D and 3-D convolutions sum in a different order: float noise only.
    assert_close(fast_latents, slow_latents, atol=1e-5, rtol=0, name="latents")
    assert_close(fast_pixels, slow_pixels, atol=1e-5, rtol=0, name="pixels")
    for fast, slow in zip(fast_images, slow_images):
        assert np.abs(fast - slow).max() <= 1  # the truncating uint8 conversion can flip one level
    assert pixels_to_pil(fast_pixels)[0].size == (48, 64)


def test_changed_diffusers_internals_switch_the_fast_path_off(tiny_pipe):
    vae = copy.deepcopy(tiny_pipe.vae)
    for module in vae.modules():
        vars(module).pop("forward", None)  # the copy starts unpatched
    conv = next(m for m in vae.modules() if hasattr(m, "_padding"))
    conv.padding = (1, 0, 0)  # a diffusers that pads inside the convolution as well
    assert "pads inside the convolution" in fast_path_problem(vae)
    frames = SingleFrameVAE(vae)
    assert not frames.fast_path and frames.problem
    assert not any("forward" in vars(m) for m in vae.modules())  # nothing patched


def test_vae_tiling_runs_in_tiles_and_keeps_seams_small(tiny_pipe):
    decoded_tiles = []
    hook = tiny_pipe.vae.decoder.register_forward_pre_hook(lambda module, args: decoded_tiles.append(args[0].shape))
    try:
        plain = np.asarray(tiny_pipe.generate("a lake", width=320, height=320, steps=1, seed=5)[0], dtype=np.int16)
        assert len(decoded_tiles) == 1
        tiny_pipe.enable_vae_tiling()
        decoded_tiles.clear()
        tiled = np.asarray(tiny_pipe.generate("a lake", width=320, height=320, steps=1, seed=5)[0], dtype=np.int16)
    finally:
        tiny_pipe.enable_vae_tiling(False)
        hook.remove()
    assert len(decoded_tiles) == 4  # 320 px in tiles of 256 px every 192 px: 2 × 2 tiles
    difference = np.abs(plain - tiled)
    # Stated bound for the random-weight VAE, whose mid-block attention sees only its own tile: a mean
    # error of at most 5 grey levels and 99% of the values within 32 (misplaced or unblended tiles
    # give tens of levels on average).
    assert 0 < difference.mean() <= 5
    assert np.percentile(difference, 99) <= 32
