"""``internvl-u download``: the hub's own download function is the only thing replaced (no network here)."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import pytest
from conftest import TINY_CHECKPOINT
from huggingface_hub import constants

from internvl_u_core.cli import main


@pytest.fixture
def reachable_hub(monkeypatch):
    """A local HTTP server standing in for the hub's front page (the command checks it answers)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield
    server.shutdown()
    server.server_close()


def test_download_fetches_only_what_the_pipeline_reads_into_the_folder(reachable_hub, monkeypatch, tmp_path, capsys):
    calls = []

    def fake_snapshot_download(repo_id, *, revision, allow_patterns, local_files_only, local_dir):
        calls.append((repo_id, revision, local_files_only))
        source = Path(TINY_CHECKPOINT)
        for file in source.rglob("*"):
            relative = file.relative_to(source).as_posix()
            if file.is_file() and any(fnmatch(relative, pattern) for pattern in allow_patterns):
                (Path(local_dir) / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, Path(local_dir) / relative)
        (Path(local_dir) / "vlm" / "extra.bin").write_bytes(b"never fetched by the real hub with these patterns")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    target = tmp_path / "InternVL-U"
    assert main(["download", "--local-dir", str(target)]) == 0
    printed = capsys.readouterr()
    assert calls == [("InternVL-U/InternVL-U", None, False)]
    assert printed.out.strip() == str(target) and f"--model {target}" in printed.err
    assert (target / "model_index.json").is_file() and (target / "vae").is_dir()
    # The patterns leave pickles out: the tiny checkpoint's copy has no .bin/.pt beyond the fake's own.
    assert sorted(p.name for p in target.rglob("*.bin")) == ["extra.bin"]


def test_hub_errors_are_told_in_our_words(reachable_hub, monkeypatch, capsys):
    def missing(repo_id, **_):
        # The hub's own type (built without an HTTP response, which its constructor wants).
        error = huggingface_hub.errors.RepositoryNotFoundError.__new__(huggingface_hub.errors.RepositoryNotFoundError)
        Exception.__init__(error, f"404 Client Error for {repo_id}")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    assert main(["download", "someone/nothing-here"]) == 2
    err = capsys.readouterr().err
    assert "there is no model 'someone/nothing-here' on the Hugging Face hub" in err and "404" not in err
    assert main(["download", "not a hub id"]) == 2
    assert "is not a hub id of the form 'owner/name'" in capsys.readouterr().err


def test_an_unreachable_hub_is_said_plainly_and_quickly(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}  # port 9: refused
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "internvl_u_core.cli", "download", "--local-dir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "internvl-u: error: cannot reach the Hugging Face hub (http://127.0.0.1:9)"), result.stderr
    assert "Traceback" not in result.stderr
