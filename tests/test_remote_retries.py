"""``RemoteInternVLU``'s retries against a scripted HTTP server on 127.0.0.1 (503s, dropped connections).

The server answers each request with the next scripted action and records the bodies, so the tests
see exactly what was sent again. Ray's side (a replica really dying) is in tests/test_ray_serve.py.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from serving import png_bytes

from internvl_u_core import RemoteInternVLU
from internvl_u_core.remote import RemoteError

PICTURE = Image.new("RGB", (16, 16), (200, 40, 10))


class Scripted(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, actions: list[str]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.actions = list(actions)
        self.bodies: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.bodies.append(json.loads(body))
        action = self.server.actions.pop(0) if self.server.actions else "ok"
        if action == "drop":  # the connection closes without an answer (a replica's machine gone)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if action in ("503", "429"):
            status, code = (503, "replica_unavailable") if action == "503" else (429, "queue_full")
            self.answer(status, {"error": {"message": "not now", "type": "server_error", "param": None, "code": code}},
                        {"Retry-After": "0"})
            return
        self.answer(200, {"created": 0, "data": [{"b64_json": base64.b64encode(png_bytes(PICTURE)).decode()}]})

    def answer(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    servers = []

    def start(*actions: str) -> Scripted:
        server = Scripted(list(actions))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_503_and_a_dropped_connection_are_retried_with_the_same_seed(scripted):
    server = scripted("503", "drop", "ok")
    with RemoteInternVLU(server.url, api_key="", retries=3, backoff=0) as remote:
        picture = remote.generate("a red fox", width=16, height=16, steps=2)[0]  # no seed given
    assert picture.tobytes() == PICTURE.tobytes()
    assert len(server.bodies) == 3
    assert server.bodies[0]["seed"] is not None  # chosen here, before the first attempt
    assert server.bodies[0] == server.bodies[1] == server.bodies[2]  # the very same request each time


def test_giving_up_says_so(scripted):
    server = scripted("503", "503", "503", "ok")
    with RemoteInternVLU(server.url, api_key="", retries=2, backoff=0) as remote:
        with pytest.raises(RemoteError, match="gave up after 3 attempts") as caught:
            remote.generate("a red fox", width=16, height=16, steps=2, seed=4)
    assert caught.value.status_code == 503 and caught.value.code == "replica_unavailable"
    assert len(server.bodies) == 3 and {b["seed"] for b in server.bodies} == {4}


def test_a_full_queue_is_not_retried_and_retries_0_sends_once(scripted):
    server = scripted("429", "503")
    with RemoteInternVLU(server.url, api_key="", retries=3, backoff=0) as remote:
        with pytest.raises(RemoteError) as caught:
            remote.generate("x", width=16, height=16, steps=1)
    assert caught.value.status_code == 429 and len(server.bodies) == 1
    with RemoteInternVLU(server.url, api_key="", retries=0) as once:
        with pytest.raises(RemoteError) as caught:
            once.generate("x", width=16, height=16, steps=1)
    assert caught.value.status_code == 503 and "gave up" not in str(caught.value)
    assert len(server.bodies) == 2 and "seed" not in server.bodies[1]  # unseeded stays unseeded without retries


@pytest.mark.parametrize("retries, backoff", [(-1, 1.0), (101, 1.0), (1, -0.5), (1, float("nan"))])
def test_retry_settings_are_checked(retries, backoff):
    with pytest.raises(ValueError):
        RemoteInternVLU("http://127.0.0.1:9", retries=retries, backoff=backoff)
