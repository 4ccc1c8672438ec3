"""A real ``internvl-u serve`` process on a free 127.0.0.1 port (shared by the server and client tests)."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY_CHECKPOINT = ROOT / "tests" / "fixtures" / "internvlu-tiny" / "checkpoint"
FOX = ROOT / "tests" / "fixtures" / "internvlu-tiny" / "inputs" / "img_fox_80x60.png"
MODEL = "internvl-u-tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m internvl_u_core.cli serve --model <checkpoint> …`` (the tiny one unless told), log in ``log_path``.

    Also used by ``bench/serve.py``.
    """

    def __init__(self, log_path: Path, *flags: str, api_key: str | None = None, model_name: str | None = MODEL,
                 model: Path = TINY_CHECKPOINT, threads: int | None = None):
        self.log_path = log_path
        self.model = model
        self.threads = threads or torch.get_num_threads()
        self.flags = list(flags)
        self.api_key = api_key
        self.model_name = model_name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 180.0) -> ServerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # The same thread count as this process: pixels are compared bit for bit with in-process calls.
        threads = str(self.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        command = [
            sys.executable, "-m", "internvl_u_core.cli", "serve", "--model", str(self.model),
            *(["--served-model-name", self.model_name] if self.model_name else []), "--dtype", "float32", "--device", "cpu", "--port", str(self.port),
            "--log-level", "warning", *self.flags,
        ]
        if self.api_key:
            command += ["--api-key", self.api_key]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {timeout} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def health(self) -> dict:
        """/health; with the key (if any) it also tells the queue's numbers."""
        return httpx.get(f"{self.url}/health", headers=self.headers, timeout=10).json()

    def wait_for(self, condition, timeout: float = 120.0) -> dict:
        """Poll /health until ``condition(health)`` holds (a generous bound, not a speed assertion)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if condition(health):
                return health
            time.sleep(0.05)
        raise AssertionError(f"/health never satisfied the condition; last: {self.health()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.log.close()
        return self.process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_bytes().decode(errors="replace")[-chars:]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims ``width`` × ``height`` (a decompression bomb's signature)."""
    raw = png_bytes(Image.new("RGB", (1, 1)))
    chunk = b"IHDR" + struct.pack(">II", width, height) + raw[24:29]
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def pixels_b64(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def fox() -> Image.Image:
    return Image.open(FOX).convert("RGB")
