"""``internvl-u serve`` against careless and hostile clients: one request never harms another, memory is
bounded before work is admitted, no input gives a 5xx or shows a server path, cross-site requests are
refused, and the operator's limits hold. A real server process on 127.0.0.1 (tiny checkpoint)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from serving import MODEL, ROOT, TINY_CHECKPOINT, ServerProcess, pixels, pixels_b64
from test_serve_http import held_request

from internvl_u_core import GenerationCancelled, Reasoning

KEY = "hostile-key"
SLOW = {"prompt": "slow", "size": "32x32", "num_inference_steps": 1000, "think": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("hostile") / "server.log", "--max-batch", "4",
                            "--max-new-tokens", "64", "--max-images", "2", "--max-input-images", "3",
                            api_key=KEY).start()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as session:
        yield session


def rss_peak_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


# ----------------------------------------------------------------------------------------------
# One request never fails another
# ----------------------------------------------------------------------------------------------
def test_a_wrong_reasoning_in_a_batch_fails_only_its_own_request(server, tiny_pipe):
    """The issue's case: with --max-batch 4, an innocent request waits next to one whose reasoning was made
    for another number of images; the innocent one gets exactly its lone pixels, the other its own 400."""
    innocent = {"prompt": "a quiet lake", "size": "32x32", "seed": 4, "num_inference_steps": 2, "think": False}
    wrong = tiny_pipe.reason("a quiet lake", max_new_tokens=4).to_dict()
    wrong["num_images"] = 1  # well-formed, but made for one input image: this request has none
    culprit = {**innocent, "seed": 5, "reasoning": wrong}
    innocent_reasoned = {**innocent, "reasoning": {**wrong, "num_images": 0}}
    culprit_ids = {**culprit, "reasoning": {**wrong, "num_images": 0, "token_ids": [10**9]}}

    def post(body):
        return httpx.post(f"{server.url}/v1/images/generations", headers=server.headers, json=body, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        with held_request(server, SLOW, lambda h: h["running"] == 1):
            answers = [pool.submit(post, body) for body in (innocent, culprit, innocent_reasoned, culprit_ids)]
            time.sleep(1.0)
        answers = [a.result() for a in answers]
    assert answers[0].status_code == 200 and answers[2].status_code == 200, [a.text for a in answers]
    alone = tiny_pipe.generate("a quiet lake", width=32, height=32, steps=2, seed=4)[0]
    assert np.array_equal(pixels_b64(answers[0].json()["data"][0]["b64_json"]), pixels(alone))
    reasoned = tiny_pipe.generate("a quiet lake", width=32, height=32, steps=2, seed=4,
                                  reasoning=Reasoning.from_dict({**wrong, "num_images": 0}))[0]
    assert np.array_equal(pixels_b64(answers[2].json()["data"][0]["b64_json"]), pixels(reasoned))
    for refused in (answers[1], answers[3]):
        assert refused.status_code == 400 and error_of(refused)["param"] == "reasoning", refused.text


def test_a_batch_that_fails_anyway_runs_its_rows_alone(tiny_pipe):
    """Past admission (called here without it), a batch refused for one row runs each row alone."""
    from internvl_u_core.draw_request import DrawRequest
    from internvl_u_serve.http.engine import DrawWork, Engine, Job

    loop = asyncio.new_event_loop()
    engine = Engine(tiny_pipe, max_batch=4)
    try:
        thought = Reasoning("t", (1, 2), "a hill", num_images=0)
        out_of_vocabulary = Reasoning("t", (10**9,), "a hill", num_images=0)
        jobs = [Job(DrawWork(DrawRequest("a hill", seed=seed, width=32, height=32, steps=2, reasoning=reasoning)), loop)
                for seed, reasoning in ((3, thought), (4, out_of_vocabulary))]
        engine._run_batch(jobs)  # what the worker thread does with a group of equal batch keys
        loop.run_until_complete(asyncio.wait([job.future for job in jobs]))
    finally:
        engine.close()
        loop.close()
    alone = tiny_pipe.generate("a hill", width=32, height=32, steps=2, seed=3, reasoning=thought)[0]
    assert np.array_equal(pixels(jobs[0].future.result().images[0]), pixels(alone))
    assert "reasoning.token_ids" in str(jobs[1].future.exception())
    assert not isinstance(jobs[1].future.exception(), GenerationCancelled)


# ----------------------------------------------------------------------------------------------
# Memory is bounded before work is admitted
# ----------------------------------------------------------------------------------------------
def _png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """An all-zero PNG of any size, written row by row (never held decoded here)."""
    channels = {0: 1, 2: 3}[colour_type]
    row = b"\x00" + bytes((width * channels * bit_depth + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height, depth, colour, route", [
    pytest.param(12000, 12000, 1, 0, "chat", id="1-bit-bomb-data-uri"),
    pytest.param(12000, 12000, 16, 0, "edit", id="16-bit-upload"),
])
def test_image_bombs_are_refused_from_the_header_fast_and_without_memory(server, http, width, height, depth,
                                                                         colour, route):
    bomb = _png(width, height, depth, colour)
    before = rss_peak_kib(server.pid)
    started = time.perf_counter()
    if route == "chat":
        uri = "data:image/png;base64," + base64.b64encode(bomb).decode()
        answer = http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What?"}]}]})
    else:
        answer = http.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("b.png", bomb, "image/png")})
    elapsed = time.perf_counter() - started
    grown_mib = (rss_peak_kib(server.pid) - before) / 1024
    assert answer.status_code == 400 and "12000×12000" in error_of(answer)["message"], answer.text
    assert elapsed < 0.5 and grown_mib < 100, (len(bomb), elapsed, grown_mib)


def test_a_non_image_upload_is_explained_in_our_words(http):
    answer = http.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.txt", b"hello", "text/plain")})
    message = error_of(answer)["message"]
    assert answer.status_code == 400 and error_of(answer)["param"] == "image"
    assert "BytesIO" not in message and "0x" not in message and "cannot read the 5-byte upload" in message


def test_the_queue_is_checked_before_images_are_decoded(tmp_path):
    """With the one queue slot taken, a request carrying an image bomb gets 429 (not a 400 after decoding)."""
    process = ServerProcess(tmp_path / "server.log", "--max-queue", "1").start()
    try:
        with held_request(process, SLOW, lambda h: h["running"] == 1), \
                held_request(process, SLOW, lambda h: h["waiting"] == 1):
            uri = "data:image/png;base64," + base64.b64encode(_png(12000, 12000, 1, 0)).decode()
            answer = httpx.post(f"{process.url}/v1/chat/completions", timeout=60, json={"messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]})
            assert answer.status_code == 429
    finally:
        assert process.stop() == 0, process.log_tail()


# ----------------------------------------------------------------------------------------------
# No 500 from any input; nothing private
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    pytest.param(b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "prompt", id="deep-json"),
    pytest.param(b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", "seed", id="5000-digit-int"),
    pytest.param(b'{"prompt": "x", "flow_shift": 1e30}', "flow_shift", id="flow-shift-1e30"),
    pytest.param(b'{"prompt": "x", "flow_shift": 10000}', "flow_shift", id="flow-shift-1e4"),
    pytest.param(b'{"prompt": "x", "timestep_trunc": 1e300}', "timestep_trunc", id="timestep-trunc"),
    pytest.param(b'{"prompt": "x", "all_cfg_scale": ' + b"9" * 400 + b"}", "all_cfg_scale", id="long-scale"),
    pytest.param(b'{"prompt": "x", "num_inference_steps": 1001}', "num_inference_steps", id="over-max-steps"),
    pytest.param(b'{"prompt": "x", "n": 3}', "n", id="over-max-images"),
])
def test_hostile_numbers_and_nesting_get_a_400_naming_the_field(http, body, param):
    answer = http.post("/v1/images/generations", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and error_of(answer)["param"] == param, answer.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations", "/v1/images/edits"])
@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", None])
def test_cross_site_content_types_get_415(http, path, kind):
    headers = {} if kind is None else {"Content-Type": kind}
    body = json.dumps({"prompt": "x", "messages": [{"role": "user", "content": "x"}]})
    answer = http.post(path, content=body, headers=headers)
    assert answer.status_code == 415 and error_of(answer)["code"] == "unsupported_media_type"
    if path.endswith("edits"):
        assert http.post(path, json={"prompt": "x"}).status_code == 415


def test_auth_is_middleware_over_every_route_but_health(server):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v2/anything"),
                         ("GET", "/docs"), ("DELETE", "/v1/models")]:
        assert httpx.request(method, server.url + path).status_code == 401, path
    public = httpx.get(server.url + "/health")
    assert public.status_code == 200 and public.json() == {"status": "ok"}
    assert set(httpx.get(server.url + "/health", headers=server.headers).json()) > {"status", "waiting"}


def test_no_server_path_in_any_answer(tmp_path):
    """Without --served-model-name the name is the checkpoint folder's own, never its path; without a key
    only this machine's names are answered as Host (DNS rebinding)."""
    process = ServerProcess(tmp_path / "server.log", "--allow-host", "example.test", model_name=None)
    process.start()
    try:
        answers = [httpx.get(f"{process.url}/health"), httpx.get(f"{process.url}/v1/models"),
                   httpx.post(f"{process.url}/v1/images/generations", json={"model": "nope", "prompt": "x"}),
                   httpx.get(f"{process.url}/nowhere")]
        assert answers[1].json()["data"][0]["id"] == TINY_CHECKPOINT.name
        assert answers[2].status_code == 404
        for answer in answers:
            assert str(ROOT) not in answer.text and "/tmp" not in answer.text, answer.text
        rebound = httpx.get(f"{process.url}/health", headers={"Host": f"attacker.example:{process.port}"})
        assert rebound.status_code == 421
        for host in (f"localhost:{process.port}", "example.test"):
            assert httpx.get(f"{process.url}/health", headers={"Host": host}).status_code == 200
    finally:
        assert process.stop() == 0, process.log_tail()


# ----------------------------------------------------------------------------------------------
# Operator limits, start and stop
# ----------------------------------------------------------------------------------------------
def test_operator_limits_are_applied_and_shown(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    limits = client.models.list().data[0].to_dict()["limits"]
    assert (limits["max_new_tokens"], limits["max_output_images"], limits["max_images_per_prompt"]) == (64, 2, 3)
    assert limits["max_request_memory_bytes"] > limits["max_body_bytes"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=65)


def test_a_taken_port_fails_in_one_line_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "internvl_u_core.cli", "serve", "--model", str(TINY_CHECKPOINT),
                               "--device", "cpu", "--port", str(port)], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], done.stderr
    assert "Loading" not in done.stderr and time.monotonic() - started < 60


def test_the_openai_client_reads_an_image_chat_answer_without_warnings(server):
    """The answer's fields parse into the client's types without a serializer warning. (``to_dict()`` still
    warns about ``message.content``: vLLM-Omni sends the image as a list of content parts there, which
    the client types as a string; our answer keeps vLLM-Omni's shape, see the README.)"""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a dot"}],
                                                extra_body={"modalities": ["image"], "width": 32, "height": 32,
                                                            "seed": 1, "num_inference_steps": 1})
        part = answer.choices[0].message.content[0]
        assert part["image_url"]["url"].startswith("data:image/png;base64,")
        assert answer.usage.total_tokens == 0 and answer.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------------------------
# Raw bytes against the real server
# ----------------------------------------------------------------------------------------------
def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and read whatever comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server may close early on garbage
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


RAW_CASES = 300


def test_raw_byte_mutations_never_get_a_5xx_or_a_traceback(server):
    """Random mutations (flips, insertions, cuts, splices) of valid requests, over raw TCP."""
    import random

    rng = random.Random(18)
    body = json.dumps({"prompt": "x", "size": "32x32", "num_inference_steps": 1, "think": False, "seed": 1}).encode()
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    templates = [
        (f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body,
        (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
         f"Content-Type: application/json\r\nContent-Length: {len(chat)}\r\n\r\n").encode() + chat,
        (f"POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
         "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 60\r\n\r\n"
         '--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n').encode(),
    ]
    statuses = {}
    for _ in range(RAW_CASES):
        data = bytearray(rng.choice(templates))
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data))
            action = rng.random()
            if action < 0.4:
                data[where] = rng.randrange(256)
            elif action < 0.6:
                data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif action < 0.8:
                data[where:where] = rng.choice([b"[" * 2000, b"9" * 5000, b"\\u0000", b"NaN", b"\r\n", b'"', b"{"])
            else:
                del data[where: where + rng.randint(1, 20)]
        answer = _raw_exchange(server.port, bytes(data))
        status = int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") and answer[9:12].isdigit() else None
        statuses[status] = statuses.get(status, 0) + 1
        assert status is None or status < 500, (bytes(data), answer[:500])
        assert b"Traceback" not in answer and str(ROOT).encode() not in answer
    assert sum(count for status, count in statuses.items() if status) > RAW_CASES // 2, statuses
    assert httpx.get(f"{server.url}/health").status_code == 200


# ----------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------
def test_a_stream_client_that_stops_reading_is_cut_off_and_its_job_cancelled(tiny_pipe):
    """In-process server (a small stream buffer): previews pile up behind a client that reads nothing."""
    import threading

    import uvicorn

    from internvl_u_serve.http.app import OpenAIServer, allowed_hosts_for
    from internvl_u_serve.http.engine import Engine
    from internvl_u_serve.http.protocol import ServerSettings

    engine = Engine(tiny_pipe, max_queue=2)
    buffer = 64 * 1024
    app = OpenAIServer(engine, ServerSettings(model_name="tiny", stream_buffer_bytes=buffer),
                       allowed_hosts=allowed_hosts_for("127.0.0.1")).app
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # inherited by accepted sockets: small kernel
    listener.bind(("127.0.0.1", 0))                                   # buffers, so the stall reaches the server
    listener.listen()
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = json.dumps({"prompt": "noise", "size": "64x64", "num_inference_steps": 1000, "partial_images": 1000,
                           "stream": True, "think": False}).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall((f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                          f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
            deadline = time.monotonic() + 120
            while engine.stats()["cancelled"] == 0 or engine.stats()["running"]:
                assert time.monotonic() < deadline, engine.stats()
                time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()
        listener.close()
