"""``internvl_u_serve.ray`` on a real local Ray cluster (127.0.0.1, 2 CPUs, no dashboard), tiny checkpoint.

One cluster and one two-replica application for the whole module (starting them is most of the
time). Pixels and text are compared bit for bit with the in-process pipeline: the replicas run
with this process's thread count. Skipped when Ray Serve (the ``[ray]`` extra) is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from serving import MODEL, ROOT, TINY_CHECKPOINT, free_port, pixels, pixels_b64

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

from internvl_u_core import RemoteInternVLU  # noqa: E402
from internvl_u_serve import ray as on_ray  # noqa: E402

APP = "internvl-u-test"
REPLICA = on_ray.REPLICA_HEADER
OPTIONS = {"model": str(TINY_CHECKPOINT), "served_model_name": MODEL, "dtype": "float32", "device": "cpu",
           "max_batch": 4, "max_queue": 64, "max_body_mb": 1, "cpus_per_replica": 0.5, "log_level": "warning", "shutdown_timeout": 120}
# A request's whole round trip may take this long on a loaded 2-core machine (a hang fails the test).
BOUND = 150.0


def deploy(replicas: int) -> None:
    serve.run(on_ray.build_app(on_ray.serve_options({**OPTIONS, "replicas": replicas})), name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster whose workers import this checkout, with two replicas of the tiny model."""
    threads = str(torch.get_num_threads())
    with pytest.MonkeyPatch.context() as patch:
        # The raylet and every worker inherit this environment: the replicas and the proxy run this
        # checkout's code with this process's thread count (for bit-equal pixels).
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        patch.setenv("OMP_NUM_THREADS", threads)
        patch.setenv("MKL_NUM_THREADS", threads)
        patch.setenv(on_ray.PROXY_CALLBACK_ENV, on_ray.PROXY_CALLBACK)
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
                 _node_ip_address="127.0.0.1", namespace=f"internvl-u-test-{os.getpid()}", log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            deploy(2)
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster, timeout=BOUND) as session:
        yield session


def draw(http: httpx.Client, seed: int, steps: int = 1, size: str = "32x32") -> httpx.Response:
    return http.post("/v1/images/generations", json={"prompt": "a red fox", "size": size, "seed": seed,
                                                     "num_inference_steps": steps, "model": MODEL})


def replica_pids() -> dict[str, int]:
    """Live replicas of the test application: replica id → process id (from Ray's actor table)."""
    from ray._private import state

    prefix = f"SERVE_REPLICA::{APP}#{on_ray.DEPLOYMENT_NAME}#"
    return {info["Name"][len(prefix):]: info["Pid"] for info in state.actors().values()
            if info.get("Name", "").startswith(prefix) and info.get("State") == "ALIVE"}


def replica_id(response: httpx.Response) -> str:
    """``InternVLU#<id>@<host>`` → ``<id>``."""
    return response.headers[REPLICA].split("#", 1)[1].rsplit("@", 1)[0]


def wait_for_replicas(count: int, timeout: float = 240.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        pids = replica_pids()
        if status is not None and status.status == "RUNNING" and len(pids) == count:
            return pids
        time.sleep(0.5)
    raise AssertionError(f"the application never had {count} running replicas: {serve.status()}")


# ----------------------------------------------------------------------------------------------
# Without a cluster: options, the proxy's error translation
# ----------------------------------------------------------------------------------------------
def test_options_are_the_serve_commands():
    options = on_ray.serve_options({**OPTIONS, "autoscale": "0:3", "gpus_per_replica": 0.5,
                                    "allow_image_host": ["a.example", "b.example"], "think": True},
                                   env={on_ray.ARGS_ENV: "--revision v1 --max-batch 2"})
    assert options.revision == "v1" and options.max_batch == 4  # application args override the env's flags
    assert options.allow_image_host == ["a.example", "b.example"] and options.think
    placed = on_ray.deployment_options(options)
    assert placed["max_ongoing_requests"] == 4 + 64 and placed["max_queued_requests"] == 64
    assert placed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.5}
    scaling = placed["autoscaling_config"]
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (0, 3, 4)
    assert "num_replicas" not in placed and placed["graceful_shutdown_timeout_s"] == 120
    assert not set(on_ray.PLACEMENT_OPTIONS) & set(vars(on_ray.replica_options(options)))
    with pytest.raises(ValueError, match="--autoscale"):
        on_ray.serve_options({**OPTIONS, "autoscale": "3:1"})
    with pytest.raises(ValueError, match="--max-batch"):
        on_ray.serve_options({**OPTIONS, "max_batch": 0})
    with pytest.raises(ValueError, match="no model given"):
        on_ray.serve_options({"max_batch": 2}, env={})


async def _call(app, path: str = "/v1/images/generations") -> list[dict]:
    """The ASGI messages the proxy middleware sends around ``app``."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    await on_ray.OpenAIErrors(app)(scope, receive, send)
    return sent


@pytest.mark.asyncio
async def test_the_proxy_answers_503_for_a_replica_that_died():
    async def died(scope, receive, send):  # Ray's proxy ends the request without a response
        return None

    sent = await _call(died)
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == str(on_ray.RETRY_AFTER_REPLICA_LOST).encode()
    error = json.loads(body["body"])["error"]
    assert error["code"] == "replica_unavailable" and error["type"] == "server_error"

    async def refused(scope, receive, send):  # Ray's own plain-text refusal (a full proxy queue)
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"5")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure", "more_body": False})

    sent = await _call(refused)
    assert sent[0]["status"] == 429 and dict(sent[0]["headers"])[b"retry-after"] == b"5"
    assert json.loads(sent[1]["body"])["error"]["code"] == "queue_full"

    async def cut(scope, receive, send):  # a stream whose replica died after two events
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    sent = await _call(cut)
    assert sent[-1]["more_body"] is False and b"replica_unavailable" in sent[-1]["body"]
    assert sent[-1]["body"].startswith(b"event: error\ndata: ")


# ----------------------------------------------------------------------------------------------
# On the cluster
# ----------------------------------------------------------------------------------------------
def test_the_openai_client_gets_the_in_process_answers(cluster, http, tiny_pipe):
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0)
    answer = client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="48x32", response_format="b64_json",
                                    extra_body={"seed": 21, "num_inference_steps": 3})
    local = tiny_pipe.generate("a lighthouse at dusk", width=48, height=32, steps=3, seed=21)
    assert np.array_equal(pixels_b64(answer.data[0].b64_json), pixels(local[0]))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a fox"}],
                                          max_tokens=8)
    assert chat.choices[0].message.content == tiny_pipe.understand(None, "Describe a fox", max_new_tokens=8)
    # The same errors as `internvl-u serve`, and every answer names its replica.
    bad = http.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_inference_steps"
    assert bad.headers[REPLICA].startswith(f"{on_ray.DEPLOYMENT_NAME}#")
    assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
    too_large = http.post("/v1/images/generations", content=b"{" + b" " * (1024 * 1024 + 10) + b"}",
                          headers={"content-type": "application/json"})
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a fox"}],
                                            max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content


def test_forty_requests_from_eight_clients_use_both_replicas(http, tiny_pipe):
    seeds = [i % 5 for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda seed: draw(http, seed), seeds))
    assert [r.status_code for r in responses] == [200] * 40, [r.text[:200] for r in responses if r.status_code != 200]
    assert len({replica_id(r) for r in responses}) == 2
    expected = {seed: pixels(tiny_pipe.generate("a red fox", width=32, height=32, steps=1, seed=seed)[0]).tobytes()
                for seed in set(seeds)}
    assert all(pixels_b64(r.json()["data"][0]["b64_json"]).tobytes() == expected[s] for r, s in zip(responses, seeds))


def test_a_replica_killed_mid_load_loses_nothing(http, cluster, tiny_pipe, caplog):
    before = wait_for_replicas(2)
    victim, victim_pid = sorted(before.items())[0]
    outcomes: list[tuple[int, str | None, float]] = []
    remote_pictures: list[tuple[int, np.ndarray]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def raw_client(index: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = draw(http, 100 + index, steps=4)
            with lock:
                outcomes.append((response.status_code, response.headers.get("retry-after"), time.monotonic() - started))

    def remote_client(index: int) -> None:
        with RemoteInternVLU(cluster, timeout=BOUND, retries=8, backoff=0.5) as remote:
            for seed in (200 + index, 210 + index):
                picture = remote.generate("a red fox", width=32, height=32, steps=4, seed=seed)[0]
                with lock:
                    remote_pictures.append((seed, pixels(picture)))

    caplog.set_level(logging.WARNING, logger="internvl_u_core.remote")
    with ThreadPoolExecutor(8) as pool:
        raw = [pool.submit(raw_client, i) for i in range(4)]
        remotes = [pool.submit(remote_client, i) for i in range(4)]
        deadline = time.monotonic() + BOUND  # both replicas are busy once each has answered
        while time.monotonic() < deadline and len(outcomes) < 4:
            time.sleep(0.1)
        os.kill(victim_pid, signal.SIGKILL)
        for future in remotes:
            future.result(timeout=4 * BOUND)  # RemoteInternVLU's retries complete every request
        stop.set()
        for future in raw:
            future.result(timeout=BOUND)
    statuses = [status for status, _, _ in outcomes]
    assert set(statuses) <= {200, 503}, outcomes
    assert all(retry is not None and int(retry) >= 1 for status, retry, _ in outcomes if status == 503), outcomes
    assert max(seconds for _, _, seconds in outcomes) < BOUND
    retried = sum("attempt 2 of" in r.getMessage() for r in caplog.records)
    print(f"replica killed: raw clients got {statuses.count(200)} × 200 and {statuses.count(503)} × 503 "
          f"(slowest {max(seconds for _, _, seconds in outcomes):.1f} s); RemoteInternVLU retried {retried} requests")
    lost = statuses.count(503) + retried
    assert lost >= 1, "the killed replica held no request: the test did not test anything"
    assert len(remote_pictures) == 8
    for seed, picture in remote_pictures:
        assert np.array_equal(picture, pixels(tiny_pipe.generate("a red fox", width=32, height=32, steps=4, seed=seed)[0]))
    # Ray brings the replica back (a new one, in a new process), and it answers.
    after = wait_for_replicas(2)
    assert victim not in after and victim_pid not in after.values()
    seen = {replica_id(draw(http, 1)) for _ in range(12)}
    assert seen & (set(after) - set(before)), f"the new replica never answered: {seen}, {after}"


def test_downscale_drains_running_jobs(http, tiny_pipe):
    wait_for_replicas(2)
    slow = {"prompt": "a slow fox", "size": "32x32", "num_inference_steps": 30, "seed": 9, "model": MODEL}
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(http.post, "/v1/images/generations", json=slow) for _ in range(4)]
        time.sleep(2.0)  # the jobs have reached both replicas
        deploy(1)
        responses = [future.result(timeout=2 * BOUND) for future in running]
    assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
    assert len({replica_id(r) for r in responses}) == 2  # the replica that left had jobs, and finished them
    local = pixels(tiny_pipe.generate("a slow fox", width=32, height=32, steps=30, seed=9)[0])
    assert all(np.array_equal(pixels_b64(r.json()["data"][0]["b64_json"]), local) for r in responses)
    left = wait_for_replicas(1)
    assert {replica_id(draw(http, 2)) for _ in range(3)} == set(left)
