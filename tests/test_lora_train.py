"""``train-lora``: the objective lowers the loss, resume continues the same curve, bad data is refused first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CHECKPOINT
from lora_helpers import pixels
from PIL import Image, ImageDraw

from internvl_u_core import InvalidInputError, lora, training
from internvl_u_core.cli import main
from internvl_u_core.training import TrainConfig, train_lora

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pipe(pipe_without_loras):
    return pipe_without_loras


def _picture(name: str, size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, COLOURS[name])
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(255, 255, 255))
    return image


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """Four captioned images, as the Save Captions node writes them (one of another aspect ratio)."""
    folder = tmp_path_factory.mktemp("captioned")
    for index, name in enumerate(COLOURS):
        _picture(name, (96, 64) if index == 3 else (64, 64)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a white circle on {name}")
    return folder


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    options = dict(model=str(TINY_CHECKPOINT), out=str(out), data=str(data) if data else None, rank=8, alpha=8.0, learning_rate=1e-2,
                   steps=40, batch_size=4, resolution=64, checkpoint_every=20, sample_every=40, sample_steps=2,
                   trigger_words=("circ",))
    return TrainConfig(**(options | overrides))


def test_training_lowers_the_loss_resumes_on_the_same_curve_and_the_adapter_loads(pipe, captioned, tmp_path):
    base = pixels(pipe.generate("a white circle on red", width=64, height=64, steps=3, seed=2))
    result = train_lora(_config(captioned, tmp_path / "run.safetensors"), pipe=pipe, progress=False)
    # The same samples, noise and timesteps before and after training.
    assert result.eval_loss_after < 0.85 * result.eval_loss_before, (result.eval_loss_before, result.eval_loss_after)
    assert len(result.losses) == 40 and all(np.isfinite(result.losses))
    assert [p.name for p in result.samples] == ["step-000040-0.png", "step-000040-1.png"]
    assert Image.open(result.samples[0]).size == (64, 64)
    assert not len(pipe.loras), "the pipeline is given back without the trainee adapter"
    assert np.array_equal(pixels(pipe.generate("a white circle on red", width=64, height=64, steps=3, seed=2)), base)

    info = lora.adapter_info(result.adapter)
    assert (info.rank, info.alpha, info.trigger_words, info.extra["steps"]) == (8, 8.0, ("circ",), "40")
    name = pipe.load_lora(result.adapter)
    trained = pixels(pipe.generate("a white circle on red", width=64, height=64, steps=3, seed=2))
    assert not np.array_equal(trained, base)
    pipe.remove_lora(name)

    # Interrupted at step 20 and resumed: the same losses and the same adapter as the run without a break.
    resumed = train_lora(
        _config(captioned, tmp_path / "resumed.safetensors", resume=str(result.checkpoints[0]), sample_every=0),
        pipe=pipe, progress=False,
    )
    assert resumed.losses == result.losses
    first, _ = lora.read_adapter(result.adapter)
    second, _ = lora.read_adapter(resumed.adapter)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resume_with_other_options_is_refused(captioned, tmp_path):
    state = tmp_path / "run.checkpoints" / "step-000004"
    state.mkdir(parents=True)
    torch.save({"fingerprint": _config(captioned, tmp_path / "x.safetensors", rank=4).fingerprint(), "step": 4},
               state / "state.pt")
    with pytest.raises(InvalidInputError, match="rank"):
        train_lora(_config(captioned, tmp_path / "x.safetensors", resume=str(tmp_path / "run.checkpoints")))


def test_edit_pairs_train_and_the_adapter_edits(pipe, tmp_path):
    folder = tmp_path / "pairs"
    (folder / "source").mkdir(parents=True)
    (folder / "target").mkdir()
    for name in ("red", "blue"):
        _picture(name).save(folder / "source" / f"{name}.png")
        _picture("yellow").save(folder / "target" / f"{name}.png")
        (folder / "target" / f"{name}.txt").write_text("make the background yellow")
    config = _config(None, tmp_path / "edit.safetensors", edit_pairs=str(folder), steps=6, batch_size=2,
                     checkpoint_every=0, sample_every=6)
    result = train_lora(config, pipe=pipe, progress=False)
    assert result.eval_loss_after < result.eval_loss_before
    assert len(result.samples) == 2 and lora.adapter_info(result.adapter).extra["task"] == "edit"


def test_guidance_dropout_follows_the_released_rates():
    draws = np.linspace(0, 1, 10_000, endpoint=False)
    t2i = np.bincount([training.dropout_row(d, False) for d in draws], minlength=3) / len(draws)
    edit = np.bincount([training.dropout_row(d, True) for d in draws], minlength=3) / len(draws)
    assert np.allclose(t2i, [0.9, 0.0, 0.1]) and np.allclose(edit, [0.9, 0.05, 0.05])


def test_timesteps_are_logit_normal_then_shifted():
    sigmas = training.draw_sigmas(20_000, torch.Generator().manual_seed(0), 3.0)
    u = sigmas / (3.0 - 2.0 * sigmas)  # inverse of the shift s·u / (1 + (s − 1)·u)
    logits = torch.log(u / (1 - u))
    assert abs(float(logits.mean())) < 0.03 and abs(float(logits.std()) - 1) < 0.03


def test_buckets_are_on_the_32_pixel_grid():
    assert training.bucket_size(1024, 1024, 1024) == (1024, 1024)
    width, height = training.bucket_size(1920, 1080, 1024)
    assert width % 32 == 0 and height % 32 == 0 and abs(width / height - 1920 / 1080) < 0.05
    assert training.bucket_size(4000, 500, 512) == training.bucket_size(2000, 1000, 512)  # aspect capped at 2


def _refusal(capsys, *args) -> str:
    """Run train-lora with a model path that does not exist: the data must be refused first."""
    code = main(["train-lora", "--model", "/nonexistent/model", "--steps", "2", *args])
    assert code == 2
    return capsys.readouterr().err


def test_bad_data_is_refused_before_any_model_loads(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in _refusal(capsys, "--data", str(empty), "--out", str(tmp_path / "a.safetensors"))
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    _picture("red").save(uncaptioned / "red.png")
    (uncaptioned / "broken.png").write_bytes(b"not an image")
    (uncaptioned / "broken.txt").write_text("x")
    message = _refusal(capsys, "--data", str(uncaptioned), "--out", str(tmp_path / "a.safetensors"))
    assert "red.txt: missing" in message
    (uncaptioned / "red.txt").write_text("a red thing")
    assert "broken.png: unreadable image" in _refusal(capsys, "--data", str(uncaptioned), "--out",
                                                      str(tmp_path / "a.safetensors"))
    pairs = tmp_path / "pairs"
    (pairs / "source").mkdir(parents=True)
    (pairs / "target").mkdir()
    _picture("red").save(pairs / "target" / "x.png")
    (pairs / "target" / "x.txt").write_text("edit")
    assert "source/x.*: missing" in _refusal(capsys, "--edit-pairs", str(pairs), "--out", str(tmp_path / "a.safetensors"))
    assert ".safetensors" in _refusal(capsys, "--data", str(uncaptioned), "--out", str(tmp_path / "a.pt"))


def test_cli_trains_and_generate_uses_the_adapter(pipe, captioned, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["train-lora", "--data", str(captioned), "--out", str(out), "--model", str(TINY_CHECKPOINT),
                 "--steps", "4", "--batch", "2", "--rank", "4", "--lr", "1e-2", "--resolution", "64",
                 "--checkpoint-every", "0", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    log = json.loads((tmp_path / "cli.loss.json").read_text())
    assert len(log["losses"]) == 4
    picture = tmp_path / "g.png"
    assert main(["generate", "a white circle on red", "--model", str(TINY_CHECKPOINT), "--lora", f"{out}:0.8",
                 "--width", "64", "--height", "64", "--steps", "3", "--seed", "2", "-o", str(picture)]) == 0
    pipe.load_lora(out, scale=0.8)
    expected = pixels(pipe.generate("a white circle on red", width=64, height=64, steps=3, seed=2))
    assert np.array_equal(pixels([Image.open(picture).convert("RGB")]), expected)
