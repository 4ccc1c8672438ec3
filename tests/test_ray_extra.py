"""Without the ``[ray]`` extra, ``internvl-u serve --ray`` and ``internvl_u_serve.ray`` say what to install.

Runs whether or not Ray is installed: its absence is simulated by hiding the module.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from serving import TINY_CHECKPOINT

from internvl_u_serve.http import command


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", "--model", str(TINY_CHECKPOINT), *argv])


def test_serve_ray_without_ray_prints_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] == "ray" else real(name, *a))
    assert command.run(parse("--ray", "--replicas", "2")) == 1
    error = capsys.readouterr().err.strip()
    assert error == command.MISSING_RAY and '".[ray]"' in error and "\n" not in error


def test_importing_the_application_without_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "internvl_u_serve.ray", raising=False)
    try:
        importlib.import_module("internvl_u_serve.ray")
    except ImportError as exc:
        assert '".[ray]"' in str(exc)
    else:
        raise AssertionError("internvl_u_serve.ray imported without Ray")


def test_placement_flags_are_checked():
    for bad in (["--autoscale", "3:1"], ["--autoscale", "4"], ["--replicas", "0"], ["--gpus-per-replica", "-1"],
                ["--replicas", "2", "--autoscale", "1:2"]):
        try:
            parse(*bad)
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{bad} was accepted")
    assert parse("--ray", "--autoscale", "0:4", "--gpus-per-replica", "0.5").autoscale == "0:4"
