"""``internvl-u serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client and raw HTTP.

Every result is compared bit for bit with the in-process pipeline (same seed, same arguments).
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from serving import MODEL, ServerProcess, data_uri, fox, pixels, pixels_b64, png_bytes, png_claiming

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(
        tmp_path_factory.mktemp("serve") / "server.log", "--max-batch", "4", "--max-body-mb", "1",
        "--allow-image-host", "127.0.0.1", api_key=KEY,
    ).start()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """No batching, a one-slot queue, think mode on by default."""
    process = ServerProcess(tmp_path_factory.mktemp("solo") / "server.log", "--max-batch", "1", "--max-queue", "1",
                            "--think", "--shutdown-timeout", "0.5").start()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as session:
        yield session


# ----------------------------------------------------------------------------------------------
# The official openai client
# ----------------------------------------------------------------------------------------------
def test_images_generate_matches_in_process(client, tiny_pipe):
    answer = client.images.generate(
        model=MODEL, prompt="a red fox in the snow", size="48x32", n=2, response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 3, "all_cfg_scale": 3.0, "part_cfg_scale": 1.5,
                    "timestep_trunc": 800, "flow_shift": 2.5},
    )
    local = tiny_pipe.generate("a red fox in the snow", width=48, height=32, steps=3, seed=11, num_images=2,
                               all_cfg_scale=3.0, part_cfg_scale=1.5, timestep_trunc=800, flow_shift=2.5)
    assert [pixels_b64(d.b64_json).tobytes() for d in answer.data] == [pixels(p).tobytes() for p in local]
    assert answer.to_dict()["size"] == "48x32" and answer.to_dict()["output_format"] == "png"


def test_images_edit_one_and_several_images_match_in_process(client, tiny_pipe):
    source = fox()
    flipped = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    one = client.images.edit(model=MODEL, image=("fox.png", png_bytes(source), "image/png"), prompt="make it blue",
                             extra_body={"seed": 5, "num_inference_steps": 2})
    assert np.array_equal(pixels_b64(one.data[0].b64_json), pixels(tiny_pipe.edit(source, "make it blue", steps=2, seed=5)[0]))
    several = client.images.edit(
        model=MODEL, prompt="put them side by side", size="64x48",
        image=[("a.png", png_bytes(source), "image/png"), ("b.png", png_bytes(flipped), "image/png")],
        extra_body={"seed": 6, "num_inference_steps": 2},
    )
    local = tiny_pipe.edit([source, flipped], "put them side by side", width=64, height=48, steps=2, seed=6)
    assert np.array_equal(pixels_b64(several.data[0].b64_json), pixels(local[0]))


def test_chat_text_modality_with_an_image_matches_understand(client, tiny_pipe):
    source = fox()
    answer = client.chat.completions.create(
        model=MODEL, max_tokens=10,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(source)}},
                                               {"type": "text", "text": "What animal is this?"}]}],
    )
    expected = tiny_pipe.understand(source, "What animal is this?", max_new_tokens=10, system_prompt="Answer briefly.")
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_chat_sampling_with_seed_matches_understand(client, tiny_pipe):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story"}],
                                            max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    expected = tiny_pipe.understand(None, "Tell a story", max_new_tokens=12, do_sample=True, temperature=0.8,
                                    top_p=0.9, seed=7)
    assert answer.choices[0].message.content == expected


def test_chat_stream_concatenates_to_the_answer(client, tiny_pipe):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a fox"}],
                                            max_tokens=15, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tiny_pipe.understand(None, "Describe a fox", max_new_tokens=15)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_image_modality_draws_and_edits(client, tiny_pipe):
    drawn = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a lighthouse"}],
        extra_body={"modalities": ["image"], "height": 32, "width": 48, "num_inference_steps": 2, "seed": 9,
                    "all_cfg_scale": 4.0},
    )
    part = drawn.choices[0].message.content[0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    local = tiny_pipe.generate("a lighthouse", width=48, height=32, steps=2, seed=9, all_cfg_scale=4.0)[0]
    assert np.array_equal(pixels_b64(part["image_url"]["url"].split(",", 1)[1]), pixels(local))

    source = fox()
    edited = client.chat.completions.create(
        model=MODEL, extra_body={"modalities": ["image"], "num_inference_steps": 2, "seed": 3},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(source)}},
                                               {"type": "text", "text": "add snow"}]}],
    )
    url = edited.choices[0].message.content[0]["image_url"]["url"]
    assert np.array_equal(pixels_b64(url.split(",", 1)[1]), pixels(tiny_pipe.edit(source, "add snow", steps=2, seed=3)[0]))


def test_think_mode_returns_cot_output_and_equals_reason_then_generate(client, tiny_pipe):
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a castle"}],
        extra_body={"modalities": ["image"], "think": True, "max_tokens": 8, "height": 32, "width": 32,
                    "num_inference_steps": 2, "seed": 4},
    )
    reasoning = tiny_pipe.reason("a castle", max_new_tokens=8)
    assert answer.model_extra["cot_output"] == reasoning.text
    assert answer.model_extra["reasoning"]["token_ids"] == list(reasoning.token_ids)
    content = answer.choices[0].message.content
    assert content[0] == {"type": "text", "text": reasoning.text}
    local = tiny_pipe.generate("a castle", width=32, height=32, steps=2, seed=4, reasoning=reasoning)[0]
    assert np.array_equal(pixels_b64(content[1]["image_url"]["url"].split(",", 1)[1]), pixels(local))


def test_a_reasoning_sent_back_draws_like_generate_with_reasoning(http, tiny_pipe):
    """The ``reasoning`` extension: a chain-of-thought from an earlier request, reused exactly."""
    reasoned = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a bridge"}], "think": True, "max_tokens": 6,
    }).json()
    reasoning = tiny_pipe.reason("a bridge", max_new_tokens=6)
    assert reasoned["choices"][0]["message"]["content"] == reasoning.text
    assert reasoned["reasoning"]["token_ids"] == list(reasoning.token_ids)
    drawn = http.post("/v1/images/generations", json={
        "prompt": "a bridge", "size": "32x32", "num_inference_steps": 2, "seed": 8, "reasoning": reasoned["reasoning"],
    }).json()
    local = tiny_pipe.generate("a bridge", width=32, height=32, steps=2, seed=8, reasoning=reasoning)[0]
    assert np.array_equal(pixels_b64(drawn["data"][0]["b64_json"]), pixels(local))


# ----------------------------------------------------------------------------------------------
# Raw HTTP
# ----------------------------------------------------------------------------------------------
def test_models_and_health(http, server):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed, and nothing more told
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["waiting"] == 0


def test_raw_generation_and_multipart_edit_match_in_process(http, tiny_pipe):
    answer = http.post("/v1/images/generations", json={
        "model": MODEL, "prompt": "two cats", "size": "32x48", "seed": 2, "num_inference_steps": 2,
        "response_format": "b64_json",
    })
    assert answer.status_code == 200
    assert isinstance(answer.json()["created"], int)
    local = tiny_pipe.generate("two cats", width=32, height=48, steps=2, seed=2)[0]
    assert np.array_equal(pixels_b64(answer.json()["data"][0]["b64_json"]), pixels(local))

    source = fox()
    edit = http.post("/v1/images/edits", files=[("image", ("fox.png", png_bytes(source), "image/png"))],
                     data={"prompt": "make it night", "seed": "1", "num_inference_steps": "2", "size": "40x40"})
    local = tiny_pipe.edit(source, "make it night", width=40, height=40, steps=2, seed=1)[0]
    assert np.array_equal(pixels_b64(edit.json()["data"][0]["b64_json"]), pixels(local))


def test_image_stream_reports_every_step_and_ends_with_the_image(http, tiny_pipe):
    events = []
    with http.stream("POST", "/v1/images/generations", json={
        "prompt": "a boat", "size": "32x32", "seed": 3, "num_inference_steps": 4, "stream": True, "partial_images": 2,
    }) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    kinds = [e["type"] for e in events]
    assert kinds == ["image_generation.progress", "image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["step"] for e in events[:-1]] == [1, 2, 3, 4]
    local = tiny_pipe.generate("a boat", width=32, height=32, steps=4, seed=3)[0]
    assert np.array_equal(pixels_b64(events[-1]["b64_json"]), pixels(local))


def test_allow_listed_image_host_is_fetched_others_are_refused(http, tiny_pipe):
    source = fox()
    body = png_bytes(source)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    images = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        port = images.server_address[1]
        def ask(url):
            return http.post("/v1/chat/completions", json={"max_tokens": 6, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]})
        allowed = ask(f"http://127.0.0.1:{port}/fox.png")
        assert allowed.status_code == 200
        assert allowed.json()["choices"][0]["message"]["content"] == tiny_pipe.understand(source, "What is it?", max_new_tokens=6)
        refused = ask(f"http://localhost:{port}/fox.png")  # same machine, but not on the allow-list
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "messages[0].content[0].image_url"
        assert "allow-image-host" in refused.json()["error"]["message"]
    finally:
        images.shutdown()


# ----------------------------------------------------------------------------------------------
# Concurrency, batching, queue, cancellation
# ----------------------------------------------------------------------------------------------
PARALLEL = [(f"picture number {i} of a {animal}", 100 + i) for i, animal in enumerate(
    ["fox", "cat", "owl", "horse with a very long mane running on a beach", "dog", "eel", "bee", "crab"])]
ENDLESS = {"prompt": "endless", "size": "32x32", "num_inference_steps": 1000, "think": False}


@contextlib.contextmanager
def held_request(server: ServerProcess, body: dict, until):
    """A generation request on a raw socket, held open until the block ends, then dropped (hung up).

    Waits first until /health satisfies ``until``.
    """
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in server.headers.items())
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall((f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                      f"\r\nContent-Length: {len(payload)}\r\n{head}\r\n").encode() + payload)
        server.wait_for(until)
        yield


def _generate_all(server: ServerProcess, pool: ThreadPoolExecutor):
    def one(job):
        prompt, seed = job
        answer = httpx.post(f"{server.url}/v1/images/generations", headers=server.headers, timeout=300, json={
            "prompt": prompt, "size": "32x32", "seed": seed, "num_inference_steps": 3, "think": False})
        assert answer.status_code == 200, answer.text
        return pixels_b64(answer.json()["data"][0]["b64_json"])

    return [pool.submit(one, job) for job in PARALLEL]


@pytest.fixture(scope="module")
def batched(server):
    """The eight requests sent at once while an endless job holds the model, so that they all wait
    together; dropping the endless job then lets them run, four per denoising pass."""
    before = server.health()
    with ThreadPoolExecutor(len(PARALLEL)) as pool:
        with held_request(server, ENDLESS, lambda h: h["running"] == 1):
            futures = _generate_all(server, pool)
            server.wait_for(lambda h: h["waiting"] == len(PARALLEL))
        results = [f.result() for f in futures]
    after = server.health()
    return results, after["passes"] - before["passes"], after["cancelled"] - before["cancelled"]


def test_eight_parallel_clients_are_batched_and_match_sequential_calls(batched, tiny_pipe):
    results, passes, cancelled = batched
    for (prompt, seed), result in zip(PARALLEL, results):
        assert np.array_equal(result, pixels(tiny_pipe.generate(prompt, width=32, height=32, steps=3, seed=seed)[0]))
    assert cancelled == 1  # the endless job
    assert passes == 1 + 2, "the eight requests should have run as two batches of four (--max-batch 4)"


def test_batching_off_gives_the_same_pixels(batched, solo):
    solo_results = []
    for prompt, seed in PARALLEL:  # one at a time: the solo server's queue holds a single request
        answer = httpx.post(f"{solo.url}/v1/images/generations", timeout=300, json={
            "prompt": prompt, "size": "32x32", "seed": seed, "num_inference_steps": 3, "think": False})
        solo_results.append(pixels_b64(answer.json()["data"][0]["b64_json"]))
    assert all(np.array_equal(a, b) for a, b in zip(batched[0], solo_results))


def test_server_think_default_applies_to_image_requests(solo, tiny_pipe):
    answer = httpx.post(f"{solo.url}/v1/images/generations", timeout=300, json={
        "prompt": "a tower", "size": "32x32", "seed": 1, "num_inference_steps": 2, "max_tokens": 5}).json()
    reasoning = tiny_pipe.reason("a tower", max_new_tokens=5)
    assert answer["cot_output"] == reasoning.text
    local = tiny_pipe.generate("a tower", width=32, height=32, steps=2, seed=1, reasoning=reasoning)[0]
    assert np.array_equal(pixels_b64(answer["data"][0]["b64_json"]), pixels(local))


def test_full_queue_answers_429_with_retry_after(solo):
    before = solo.health()["cancelled"]
    with held_request(solo, ENDLESS, lambda h: h["running"] == 1), \
            held_request(solo, ENDLESS, lambda h: h["waiting"] == 1):
        refused = httpx.post(f"{solo.url}/v1/images/generations", json=ENDLESS, timeout=60)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{solo.url}/v1", api_key="none", max_retries=0).images.generate(
                prompt="x", extra_body={"think": False})
    solo.wait_for(lambda h: h["cancelled"] == before + 2 and h["running"] == 0)


def test_a_client_that_disconnects_cancels_its_running_and_queued_jobs(server):
    before = server.health()["cancelled"]
    with held_request(server, ENDLESS, lambda h: h["running"] == 1):
        with held_request(server, {**ENDLESS, "n": 2}, lambda h: h["waiting"] == 1):
            pass  # the queued job's client hangs up first: it leaves the queue
        health = server.wait_for(lambda h: h["cancelled"] == before + 1)
        assert health["waiting"] == 0 and health["running"] == 1
    # Then the running job's client: the job stops at its next step.
    server.wait_for(lambda h: h["cancelled"] == before + 2 and h["running"] == 0)


def test_sigterm_answers_running_requests_and_exits_cleanly(solo):
    """Stops the solo server (the last test that uses it): the running job gets its --shutdown-timeout, then
    a 503, and the process exits with status 0."""
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{solo.url}/v1/images/generations", timeout=300, json=ENDLESS)
        solo.wait_for(lambda h: h["running"] == 1)
        assert solo.stop() == 0, solo.log_tail()
        answer = running.result()
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "cancelled"


# ----------------------------------------------------------------------------------------------
# Auth, limits, bad requests
# ----------------------------------------------------------------------------------------------
def test_api_key_is_required_on_v1_routes(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        answer = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_bodies_over_the_limit_get_413(http):
    big = "x" * (1024 * 1024 + 10)
    answer = http.post("/v1/images/generations", json={"prompt": big})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    upload = http.post("/v1/images/edits", data={"prompt": "p"}, files=[("image", ("a.png", b"0" * (1024 * 1024 + 10)))])
    assert upload.status_code == 413


def _chat(content, **extra):
    return ("/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **extra})


def _gen(**fields):
    return ("/v1/images/generations", {"prompt": "a fox", "size": "32x32", "num_inference_steps": 1, **fields})


def _image_part(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]


BOMB = "data:image/png;base64," + base64.b64encode(png_claiming(30000, 30000)).decode()
BAD_JSON = [
    pytest.param(("/v1/chat/completions", {}), "messages", id="no-messages"),
    pytest.param(("/v1/chat/completions", {"messages": "hi"}), "messages", id="messages-not-list"),
    pytest.param(("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"},
                                                        {"role": "user", "content": "y"}]}), "messages", id="multi-turn"),
    pytest.param(_chat([{"type": "audio", "audio": "x"}]), "messages", id="part-type"),
    pytest.param(_chat(_image_part("https://example.com/a.png")), "messages", id="url-not-allowed"),
    pytest.param(_chat(_image_part("file:///etc/passwd")), "messages", id="file-url"),
    pytest.param(_chat(_image_part("data:image/png;base64,@@@")), "messages", id="bad-base64"),
    pytest.param(_chat(_image_part("data:image/png;base64," + base64.b64encode(b"not a png").decode())),
                 "messages", id="not-an-image"),
    pytest.param(_chat(_image_part(BOMB)), "messages", id="decompression-bomb"),
    pytest.param(_chat("hi", modalities=["audio"]), "modalities", id="modalities"),
    pytest.param(_chat("hi", max_tokens=0), "max_tokens", id="max-tokens"),
    pytest.param(_chat("hi", temperature=-1), "temperature", id="temperature"),
    pytest.param(_chat("hi", top_p=2), "top_p", id="top-p"),
    pytest.param(_chat("hi", n=2), "n", id="text-n"),
    pytest.param(_chat("hi", seed=-1), "seed", id="seed"),
    pytest.param(_chat("hi", stream="yes"), "stream", id="stream-type"),
    pytest.param(_chat("hi", modalities=["image"], stream=True), "stream", id="image-stream"),
    pytest.param(_chat("hi", modalities=["image"], num_inference_steps=0), "num_inference_steps", id="steps"),
    pytest.param(_chat("hi", modalities=["image"], width=0), "width", id="width"),
    pytest.param(_chat("hi", modalities=["image"], all_cfg_scale="big"), "all_cfg_scale", id="cfg-type"),
    pytest.param(_chat("hi", modalities=["image"], flow_shift=0), "flow_shift", id="flow-shift"),
    pytest.param(_chat("hi", modalities=["image"], think=True, reasoning={"text": "t", "token_ids": [1]}),
                 "think", id="think-and-reasoning"),
    pytest.param(_gen(reasoning={"text": 1}), "reasoning", id="reasoning-shape"),
    pytest.param(_gen(reasoning={"text": "t", "token_ids": [10**9]}), "reasoning", id="reasoning-vocabulary"),
    pytest.param(_gen(reasoning={"text": "t", "token_ids": [1], "num_images": 2}), "reasoning", id="reasoning-images"),
    pytest.param(("/v1/images/generations", {"size": "32x32"}), "prompt", id="no-prompt"),
    pytest.param(_gen(prompt=5), "prompt", id="prompt-type"),
    pytest.param(_gen(prompt="a\x00b"), "prompt", id="prompt-nul"),
    pytest.param(_gen(size="big"), "size", id="size-format"),
    pytest.param(_gen(size="0x32"), "size", id="size-zero"),
    pytest.param(_gen(size="5000x5000"), "size", id="size-too-large"),
    pytest.param(_gen(size="32x32", width=32), "size", id="size-and-width"),
    pytest.param(_gen(n=0), "n", id="n"),
    pytest.param(_gen(response_format="url"), "response_format", id="response-format"),
    pytest.param(_gen(output_format="gif"), "output_format", id="output-format"),
    pytest.param(_gen(extra_params={"steps": 3}), "extra_params", id="extra-params-unknown"),
    pytest.param(_gen(all_cfg_scale=2, extra_params={"all_cfg_scale": 3}), "extra_params", id="extra-params-twice"),
    pytest.param(_gen(negative_prompt="ugly"), "negative_prompt", id="negative-prompt"),
    pytest.param(_gen(guidance_scale=5), "guidance_scale", id="guidance-scale"),
    pytest.param(_gen(system_prompt="<image>"), "system_prompt", id="system-prompt"),
    pytest.param(_gen(think="maybe"), "think", id="think-type"),
    pytest.param(_gen(partial_images=-1), "partial_images", id="partial-images"),
]


@pytest.mark.parametrize(("request_", "param"), BAD_JSON)
def test_bad_json_requests_get_400_naming_the_field(http, request_, param):
    path, body = request_
    answer = http.post(path, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    # Image inputs are named down to the content part, e.g. messages[0].content[1].image_url.
    assert error["param"] == param or error["param"].startswith(f"{param}[")
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(("data", "files", "param"), [
    pytest.param({"prompt": "p"}, [], "image", id="no-image"),
    pytest.param({"prompt": "p"}, [("image", ("a.png", b"garbage", "image/png"))], "image", id="undecodable"),
    pytest.param({"prompt": "p"}, [("image", ("a.png", png_claiming(30000, 30000), "image/png"))], "image",
                 id="decompression-bomb"),
    pytest.param({}, [("image", ("a.png", png_bytes(Image.new("RGB", (8, 8))), "image/png"))], "prompt", id="no-prompt"),
    pytest.param({"prompt": "p", "seed": "abc"}, [("image", ("a.png", png_bytes(Image.new("RGB", (8, 8)))))], "seed",
                 id="seed-text"),
    pytest.param({"prompt": "p", "reasoning": "{not json"}, [("image", ("a.png", png_bytes(Image.new("RGB", (8, 8)))))],
                 "reasoning", id="reasoning-json"),
    pytest.param({"prompt": "p", "mask": "x"}, [("image", ("a.png", png_bytes(Image.new("RGB", (8, 8)))))], "mask",
                 id="mask"),
])
def test_bad_edits_get_400_naming_the_field(http, data, files, param):
    answer = http.post("/v1/images/edits", data=data, files=files or [("other", ("x.txt", b"x"))])
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_other_bad_requests(http, server):
    not_json = http.post("/v1/images/generations", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400
    assert http.post("/v1/images/edits", json={"prompt": "p"}).status_code == 415  # not multipart
    unknown_model = http.post("/v1/images/generations", json={"model": "other", "prompt": "p"})
    assert unknown_model.status_code == 404 and unknown_model.json()["error"]["param"] == "model"
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/chat/completions").status_code == 405
    with pytest.raises(openai.BadRequestError) as caught:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).images.generate(
            model=MODEL, prompt="p", size="1x1x1")
    assert caught.value.param == "size"


def test_server_still_answers_after_the_abuse(http, tiny_pipe):
    answer = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "ok?"}], "max_tokens": 4})
    assert answer.json()["choices"][0]["message"]["content"] == tiny_pipe.understand(None, "ok?", max_new_tokens=4)


def test_without_the_serve_extra_the_command_names_it_in_one_line():
    blocked = "import sys; sys.modules['uvicorn'] = None; from internvl_u_core.cli import main; "
    result = subprocess.run(
        [sys.executable, "-c", blocked + "sys.exit(main(['serve', '--model', 'unused']))"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'internvl-u serve: error: the server needs the [serve] extra: pip install -e ".[serve]" in your clone, '
        'or pip install "starlette>=0.40,<2" "uvicorn>=0.30" "python-multipart>=0.0.9" "httpx>=0.27"'
    ]



@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_quantize_and_offload_are_checked_in_flag_words_before_loading(capsys, unreadable_weights):
    from internvl_u_core import offload, quantization
    from internvl_u_core.cli import build_parser, main

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    actions = {a.dest: a for a in serve._actions}
    assert tuple(actions["quantize"].choices) == quantization.MODES
    assert tuple(actions["offload"].choices) == offload.MODES
    assert main(["serve", "--model", str(unreadable_weights), "--quantize", "nf4"]) == 2
    assert "--quantize nf4 needs a CUDA GPU" in capsys.readouterr().err
    assert main(["serve", "--model", str(unreadable_weights), "--offload"]) == 2
    assert "--offload model" in capsys.readouterr().err
