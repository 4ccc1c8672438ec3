"""The offload ladder: the hooks change nothing in the results, and CPU-only machines are refused clearly.

Offloading needs a GPU to move weights to; here the hooks are installed with the CPU as the onload
device (what diffusers' hooks allow without streams), which runs every hook and every component
move of each mode and must leave every output bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FIXTURES, NO_GPU_REASON, TINY_CHECKPOINT
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from PIL import Image

from internvl_u_core import InternVLUPipeline, InvalidInputError, offload

FOX = Image.open(FIXTURES / "internvlu-tiny" / "inputs" / "img_fox_80x60.png").convert("RGB")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _jobs(pipe) -> list:
    return [
        np.asarray(pipe.generate("a red fox", width=64, height=64, steps=2, seed=0)[0]),
        np.asarray(pipe.edit(FOX, "make it blue", steps=2, seed=0, width=64, height=64)[0]),
        pipe.understand(FOX, "What is this?", max_new_tokens=6),
        pipe.reason("a fox in the snow", max_new_tokens=6).text,
        pipe.next_token_logits("Describe the picture.", FOX),
    ]


def _hooked(pipe) -> list[bool]:
    vlm = pipe.vlm
    return [_is_group_offload_enabled(m) for m in (vlm.vision_model, vlm.language_model, pipe.generation_decoder)]


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    return _jobs(tiny_pipe)


@pytest.mark.parametrize("mode,hooks", [("model", False), ("group", True), ("sequential", True)])
def test_every_mode_gives_identical_results(reference, mode, hooks):
    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu")
    pipe._offload = offload.attach(pipe.components, mode, torch.device("cpu"))
    assert pipe.offload_mode == mode and _hooked(pipe) == [hooks] * 3
    for got, want in zip(_jobs(pipe), reference):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want)
        else:
            assert np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want
    pipe.to("cpu")  # switches offloading off and takes the hooks away
    assert pipe.offload_mode is None and _hooked(pipe) == [False] * 3
    assert np.array_equal(np.asarray(pipe.generate("a red fox", width=64, height=64, steps=2, seed=0)[0]), reference[0])


@pytest.mark.parametrize("mode", ["group", "sequential"])
def test_the_embedding_and_small_parts_stay_outside_the_hooks(mode):
    pipe = InternVLUPipeline.from_pretrained(TINY_CHECKPOINT, torch_dtype="float32", device="cpu")
    offloader = offload.attach(pipe.components, mode, torch.device("cpu"))
    hooked = {id(m) for m in offloader.hooked}
    llm = pipe.vlm.language_model
    # The embedding runs outside the LLM's forward (image features are spliced in), the released model
    # ties it to the head, and generate() follows its device: both move with the component instead.
    for resident in (llm.model.embed_tokens, llm.lm_head, pipe.vlm.special_token_embedding, pipe.vae):
        assert not any(id(m) in hooked for m in resident.modules())
        assert not hasattr(resident, "_diffusers_hook")
    assert id(llm.model.layers) in hooked and id(pipe.generation_decoder.decoder) in hooked
    vit_hooked = pipe.vlm.vision_model.encoder.layers if mode == "group" else pipe.vlm.vision_model
    assert id(vit_hooked) in hooked


@NO_CUDA
def test_offload_without_cuda_is_refused_before_any_weight_is_read(unreadable_weights):
    for mode in offload.MODES:
        with pytest.raises(InvalidInputError) as refused:
            InternVLUPipeline.from_pretrained(unreadable_weights, offload=mode)
        message = str(refused.value)
        assert f"offload={mode!r}" in message and "CUDA" in message and "\n" not in message
    with pytest.raises(InvalidInputError, match="nothing to offload to"):
        InternVLUPipeline.from_pretrained(unreadable_weights, offload="group", device="cpu")
    with pytest.raises(InvalidInputError, match="offload='blocks' is not an offload mode; use one of model, group, sequential"):
        InternVLUPipeline.from_pretrained(unreadable_weights, offload="blocks")


@NO_CUDA
def test_enable_offload_without_cuda_is_refused_and_changes_nothing(tiny_pipe):
    for mode in offload.MODES:
        with pytest.raises(InvalidInputError, match=rf"offload='{mode}' .*{NO_GPU_REASON}"):
            tiny_pipe.enable_offload(mode)
    with pytest.raises(InvalidInputError, match="nothing to offload to"):
        tiny_pipe.enable_offload("sequential", "cpu")
    assert tiny_pipe.offload_mode is None and tiny_pipe.device.type == "cpu" and _hooked(tiny_pipe) == [False] * 3
