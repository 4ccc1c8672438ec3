"""The ``internvl-u`` command line on the tiny checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import FIXTURES, TINY_CHECKPOINT
from PIL import Image

from internvl_u_core.cli import build_parser, main

FOX = str(FIXTURES / "internvlu-tiny" / "inputs" / "img_fox_80x60.png")
MODEL = ["--model", str(TINY_CHECKPOINT), "--dtype", "float32", "--device", "cpu"]


def test_help_explains_every_option(capsys):
    for command in ("understand", "reason", "generate", "edit"):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "--model" in text and "--dtype" in text


def test_understand_prints_the_answer(capsys, tiny_pipe):
    assert main(["understand", *MODEL, "--image", FOX, "--max-new-tokens", "6", "What is this?"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == tiny_pipe.understand(FOX, "What is this?", max_new_tokens=6).strip()
    assert "Model ready" in printed.err


def test_generate_and_edit_write_pngs(tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["generate", *MODEL, "a red fox", "-o", str(out), "--steps", "2", "--width", "40",
                 "--height", "24", "--num-images", "2"]) == 0
    first, second = tmp_path / "fox_1.png", tmp_path / "fox_2.png"
    assert Image.open(first).size == (40, 24) and second.is_file()
    assert "denoising" in capsys.readouterr().err
    edited = tmp_path / "edited.png"
    assert main(["edit", *MODEL, "--image", str(first), "make it blue", "-o", str(edited), "--steps", "2",
                 "--reasoning", "--reasoning-tokens", "4"]) == 0
    assert Image.open(edited).size == (40, 24)


def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path):
    assert main(["understand", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", *MODEL, "x", "--width", "0", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "width = 0" in err and "Loading" not in err  # refused before the model loads
    with pytest.raises(SystemExit, match="does not exist"):
        main(["edit", *MODEL, "--image", str(tmp_path / "nope.png"), "x"])


def test_console_script_runs_without_model_argument():
    result = subprocess.run([sys.executable, "-m", "internvl_u_core.cli", "generate", "x"], capture_output=True,
                            text=True, env={"PATH": "", "HOME": str(FIXTURES)})
    assert result.returncode != 0 and "no model given" in result.stderr


def test_vae_tiling_and_offload_flags_parse():
    args = build_parser().parse_args(["generate", "--model", "m", "--vae-tiling", "--offload", "x"])
    assert args.vae_tiling and args.offload
