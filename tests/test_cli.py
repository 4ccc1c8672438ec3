"""The ``internvl-u`` command line on the tiny checkpoint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TINY_CHECKPOINT
from PIL import Image

from internvl_u_core.cli import build_parser, main

FOX = str(FIXTURES / "internvlu-tiny" / "inputs" / "img_fox_80x60.png")
MODEL = ["--model", str(TINY_CHECKPOINT), "--dtype", "float32", "--device", "cpu"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _refused(capsys, argv: list[str]) -> str:
    """Run the CLI, check it refused with exit code 2 before reading weights, and return its message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Loading" not in err and "corrupt" not in err, f"refused only after loading: {err}"
    lines = [line for line in err.splitlines() if line.startswith("internvl-u: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _model(checkpoint: Path) -> list[str]:
    return ["--model", str(checkpoint), "--dtype", "float32"]


# ----------------------------------------------------------------------------------------------
# Refusals before any weight is read (exit code 2, the CLI's own flag names)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,words",
    [
        (["generate", "x", "--cfg", "nan"], "--cfg = nan"),
        (["generate", "x", "--part-cfg", "inf"], "--part-cfg = inf"),
        (["generate", "x", "--cfg", "-1"], "--cfg = -1"),
        (["generate", "x", "--steps", "0"], "--steps = 0"),
        (["generate", "x", "--num-images", "0"], "--num-images = 0"),
        (["generate", "x", "--width", "8"], "--width = 8"),
        (["generate", "x", "--height", "100000"], "--height = 100000"),
        (["generate", "x", "--seed", "-1"], "--seed = -1"),
        (["generate", "x", "--reasoning", "--reasoning-tokens", "0"], "--reasoning-tokens = 0"),
        (["understand", "x", "--temperature", "0"], "--temperature = 0"),
        (["understand", "x", "--temperature", "nan"], "--temperature = nan"),
        (["understand", "x", "--top-p", "1.5"], "--top-p = 1.5"),
        (["understand", "x", "--num-beams", "0"], "--num-beams = 0"),
        (["reason", "x", "--max-new-tokens", "0"], "--max-new-tokens = 0"),
        (["understand", "x", "--device", "tpu"], "--device tpu"),
        (["generate", "x", "--system-prompt", "see <image>"], "--system-prompt"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_bad_numbers_and_names_are_refused_with_the_flag_name(capsys, unreadable_weights, argv, words):
    device = [] if "--device" in argv else ["--device", "cpu"]
    message = _refused(capsys, [*argv, *_model(unreadable_weights), *device])
    assert words in message
    assert "num_inference_steps" not in message and "all_cfg_scale" not in message


def test_unreadable_images_are_refused(capsys, unreadable_weights, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    model = [*_model(unreadable_weights), "--device", "cpu"]
    for command in (["edit", "x"], ["understand", "x"], ["reason", "x"]):
        message = _refused(capsys, [*command, *model, "--image", str(tmp_path / "missing.png")])
        assert "--image" in message and "does not exist" in message
        message = _refused(capsys, [*command, *model, "--image", str(not_an_image)])
        assert "--image" in message and "is not an image file Pillow can read" in message
        assert "object at 0x" not in message  # Pillow's own text names an in-memory object
        message = _refused(capsys, [*command, *model, "--image", str(tmp_path)])
        assert "--image" in message and "is a folder" in message


@NO_CUDA
def test_device_cuda_without_cuda_is_refused_in_cli_words(capsys, unreadable_weights):
    message = _refused(capsys, ["understand", "x", *_model(unreadable_weights), "--device", "cuda"])
    assert "--device cuda" in message and "use --device cpu" in message and "device=" not in message


@NO_CUDA
def test_offload_without_cuda_is_refused_before_loading(capsys, unreadable_weights):
    message = _refused(capsys, ["generate", "x", *_model(unreadable_weights), "--offload"])
    assert "--offload" in message and "CUDA" in message and "run without --offload" in message
    message = _refused(capsys, ["generate", "x", *_model(unreadable_weights), "--offload", "--device", "cpu"])
    assert "--offload" in message and "--device cpu" in message


@NO_CUDA
@pytest.mark.parametrize("mode", ["nf4", "fp8"])
def test_quantize_modes_that_need_cuda_are_refused_before_loading(capsys, unreadable_weights, mode):
    message = _refused(capsys, ["generate", "x", *_model(unreadable_weights), "--quantize", mode])
    assert f"--quantize {mode}" in message and "CUDA" in message and "quantization=" not in message


def test_quantize_and_offload_choices_come_from_the_core():
    from internvl_u_core import offload, quantization

    for command in ("understand", "reason", "generate", "edit"):
        actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices[command]._actions}
        assert tuple(actions["quantize"].choices) == quantization.MODES
        assert tuple(actions["offload"].choices) == offload.MODES and actions["offload"].const == "model"


def test_generate_with_int8_quantization_writes_an_image(tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["generate", *MODEL, "a red fox", "-o", str(out), "--steps", "2", "--width", "32",
                 "--height", "32", "--seed", "0", "--quantize", "int8"]) == 0
    assert Image.open(out).size == (32, 32)
    assert "Quantising the LLM: int8 (torch.ao dynamic int8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "output,words",
    [("x.xyz", "'.xyz' format"), ("x", "no suffix"), ("missing/x.png", "does not exist; create it or add --mkdir")],
)
def test_bad_output_paths_are_refused(capsys, unreadable_weights, tmp_path, output, words):
    target = tmp_path / output
    message = _refused(capsys, ["generate", "x", *_model(unreadable_weights), "--device", "cpu", "-o", str(target)])
    assert "-o/--output" in message and words in message
    assert not (tmp_path / "missing").exists()


def test_old_hub_id_names_the_released_one(capsys):
    message = _refused(capsys, ["understand", "x", "--model", "OpenGVLab/InternVL-U", "--device", "cpu"])
    assert "code repository" in message and "InternVL-U/InternVL-U" in message


def test_offline_error_gives_cli_advice(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    message = _refused(capsys, ["understand", "x", "--model", "someone/not-downloaded", "--offline",
                                "--device", "cpu"])
    assert "--offline" in message and "local_files_only" not in message


def test_missing_model_exits_with_code_2_from_the_console():
    env = {key: value for key, value in os.environ.items() if key != "INTERNVL_U_MODEL"}
    result = subprocess.run([sys.executable, "-m", "internvl_u_core.cli", "generate", "x"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2
    assert "no model given" in result.stderr and "--model InternVL-U/InternVL-U" in result.stderr


@pytest.mark.parametrize("command", [["generate", ""], ["understand", "  "], ["edit", "\n", "--image", FOX]])
def test_an_empty_prompt_is_refused(capsys, unreadable_weights, command):
    message = _refused(capsys, [*command, *_model(unreadable_weights), "--device", "cpu"])
    assert "is empty" in message and "e.g. internvl-u" in message


@pytest.mark.parametrize("model,words", [("no/such/folder", "does not exist"), ("EMPTY", "no model_index.json"),
                                         ("NO_VAE", "no 'vae/' folder")])
def test_a_bad_model_is_refused_before_the_seed_line(capsys, unreadable_weights, tmp_path, model, words):
    if model == "EMPTY":
        model = str(tmp_path)
    elif model == "NO_VAE":
        model = str(tmp_path / "checkpoint")
        shutil.copytree(unreadable_weights, model, ignore=shutil.ignore_patterns("vae"))
    assert main(["generate", "a fox", "--model", model, "--device", "cpu", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert words in err and "seed:" not in err and "Loading" not in err, err


@pytest.mark.parametrize(
    "argv,words",
    [
        (["generat", "x"], "did you mean generate?"),
        (["generate", "x", "--stpes", "3"], "unrecognized arguments: --stpes 3 (did you mean --steps?)"),
        (["generate", "x", "--dtype", "bfloat"], "did you mean bfloat16"),
        (["understand", "x", "--max-new-tokns=3"], "did you mean --max-new-tokens?"),
    ],
)
def test_mistyped_commands_flags_and_choices_get_a_suggestion(capsys, argv, words):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and words in capsys.readouterr().err


def test_version_and_help_answer_without_importing_torch():
    """`internvl-u --help` must not pay for torch (seconds); the time itself is measured in the report, not here."""
    probe = ("import sys; from internvl_u_core.cli import main\n"
             "for argv in (['--version'], ['--help'], ['generate', '--help'], ['serve', '--help']):\n"
             "    try: main(argv)\n"
             "    except SystemExit as done: assert done.code == 0, argv\n"
             "print('heavy:', sorted(m for m in ('torch', 'PIL', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "internvl-u 0.1.0" in result.stdout and "--quantize MODE" in result.stdout
    assert "heavy: []" in result.stdout


# ----------------------------------------------------------------------------------------------
# What the commands do
# ----------------------------------------------------------------------------------------------
def test_help_explains_every_option(capsys):
    for command in ("understand", "reason", "generate", "edit"):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "--model" in text and "--dtype" in text and "InternVL-U/InternVL-U" in text


def test_understand_prints_the_answer(capsys, tiny_pipe):
    assert main(["understand", *MODEL, "--image", FOX, "--max-new-tokens", "6", "What is this?"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == tiny_pipe.understand(FOX, "What is this?", max_new_tokens=6).strip()
    assert "Model ready" in printed.err


def test_reason_loads_only_the_language_model(capsys, tiny_pipe):
    assert main(["reason", *MODEL, "--max-new-tokens", "5", "a poster"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == tiny_pipe.reason("a poster", max_new_tokens=5).text.strip()
    assert "Loading VLM" in printed.err
    assert "generation decoder" not in printed.err and "VAE" not in printed.err


def test_generate_and_edit_write_images(tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["generate", *MODEL, "a red fox", "-o", str(out), "--steps", "2", "--width", "40",
                 "--height", "24", "--num-images", "2", "--seed", "0"]) == 0
    first, second = tmp_path / "fox_1.png", tmp_path / "fox_2.png"
    assert Image.open(first).size == (40, 24) and second.is_file()
    err = capsys.readouterr().err
    assert "denoising" in err and "decoding the image" in err and f"writing {first}" in err
    edited = tmp_path / "edited.png"
    assert main(["edit", *MODEL, "--image", str(first), "make it blue", "-o", str(edited), "--steps", "2",
                 "--reasoning", "--reasoning-tokens", "4", "--seed", "0"]) == 0
    assert Image.open(edited).size == (40, 24)


def test_output_format_follows_the_suffix_and_mkdir_creates_the_folder(tmp_path, capsys):
    target = tmp_path / "new" / "deeper" / "fox.jpg"
    assert main(["generate", *MODEL, "a fox", "-o", str(target), "--mkdir", "--steps", "1", "--width", "32",
                 "--height", "32", "--seed", "3"]) == 0
    with Image.open(target) as written:
        assert written.format == "JPEG" and written.size == (32, 32)
    assert capsys.readouterr().out.strip() == str(target)


def test_default_seed_is_random_printed_and_reproduces(tmp_path, capsys):
    def draw(name: str, *seed: str) -> tuple[np.ndarray, str]:
        path = tmp_path / name
        assert main(["generate", *MODEL, "a fox", "-o", str(path), "--steps", "1", "--width", "32", "--height",
                     "32", *seed]) == 0
        return np.asarray(Image.open(path)), capsys.readouterr().err

    first, err = draw("first.png")
    printed = re.search(r"seed: (\d+) \(pass --seed \1", err)
    assert printed, err
    again, err = draw("again.png", "--seed", printed.group(1))
    assert "seed:" not in err  # a given seed is not announced
    assert np.array_equal(first, again)


def test_an_edit_of_a_large_photo_says_the_size_it_will_draw_at(capsys, unreadable_weights, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (5000, 3000), (90, 140, 200)).save(photo)
    assert main(["edit", "make it blue", "--image", str(photo), *_model(unreadable_weights), "--device", "cpu",
                 "--seed", "1", "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert "the first --image (5000×3000) is larger than an output may be" in err and "drawing at 4096×2457" in err
    assert "out of range" not in err and "corrupt" in err  # it went on to load (garbage weights here)
