"""``RemoteInternVLU`` against a real ``internvl-u serve`` process: the same results, callbacks and errors
as the in-process pipeline it stands in for."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from serving import MODEL, ServerProcess, fox, pixels

from internvl_u_core import (
    GenerationCancelled,
    InternVLUError,
    InvalidInputError,
    InvalidInputTypeError,
    Reasoning,
    RemoteError,
    RemoteInternVLU,
)

KEY = "client-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("remote") / "server.log", "--max-queue", "1",
                            api_key=KEY).start()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def remote(server):
    with RemoteInternVLU(f"{server.url}/v1", api_key=KEY, model=MODEL, timeout=300) as client:
        yield client


def same_pictures(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b))


def test_understand_matches_the_pipeline(remote, tiny_pipe):
    source = fox()
    flipped = source.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    for kwargs in ({"max_new_tokens": 9}, {"max_new_tokens": 9, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                            "seed": 5}, {"max_new_tokens": 6, "num_beams": 2, "min_new_tokens": 3}):
        answer = remote.understand([source, flipped], "Compare them.", system_prompt="Be brief.", **kwargs)
        assert answer == tiny_pipe.understand([source, flipped], "Compare them.", system_prompt="Be brief.", **kwargs)
    assert remote.understand(None, "Hello", max_new_tokens=5) == tiny_pipe.understand(None, "Hello", max_new_tokens=5)


def test_understand_each_matches_the_pipeline(remote, tiny_pipe):
    source = fox()
    pictures = [source, Image.new("RGB", (40, 30), (20, 120, 220)), source.transpose(Image.Transpose.ROTATE_180)]
    done = []
    answers = remote.understand_each(pictures, "What is it?", max_new_tokens=7, system_prompt="Be brief.",
                                     image_callback=lambda *progress: done.append(progress))
    assert answers == tiny_pipe.understand_each(pictures, "What is it?", max_new_tokens=7, system_prompt="Be brief.")
    assert done == [(1, 3), (2, 3), (3, 3)]
    sampled = dict(max_new_tokens=5, do_sample=True, temperature=0.8, seed=9)
    assert remote.understand_each(source, "Hi", **sampled) == tiny_pipe.understand_each(source, "Hi", **sampled)
    with pytest.raises(GenerationCancelled, match="after 1 images"):
        remote.understand_each(pictures, "What?", max_new_tokens=2, image_callback=lambda *_: False)


def test_text_callbacks_report_the_same_progress(remote, tiny_pipe):
    local_steps, remote_steps, texts = [], [], []
    local = tiny_pipe.understand(None, "Count", max_new_tokens=7, token_callback=lambda *a: local_steps.append(a))
    answer = remote.understand(None, "Count", max_new_tokens=7, token_callback=lambda *a: remote_steps.append(a),
                               text_callback=texts.append)
    assert answer == local and remote_steps == local_steps and texts[-1] == answer


def test_reason_round_trips_into_generate_and_edit(remote, tiny_pipe):
    reasoning = remote.reason("a windmill", max_new_tokens=8)
    local = tiny_pipe.reason("a windmill", max_new_tokens=8)
    assert isinstance(reasoning, Reasoning) and reasoning == local
    assert same_pictures(remote.generate("a windmill", width=32, height=32, steps=2, seed=3, reasoning=reasoning),
                         tiny_pipe.generate("a windmill", width=32, height=32, steps=2, seed=3, reasoning=local))
    source = fox()
    edit_reasoning = remote.reason("paint it", source, max_new_tokens=6)
    assert edit_reasoning == tiny_pipe.reason("paint it", source, max_new_tokens=6)
    assert same_pictures(remote.edit(source, "paint it", steps=2, seed=1, reasoning=edit_reasoning),
                         tiny_pipe.edit(source, "paint it", steps=2, seed=1, reasoning=edit_reasoning))


def test_generate_matches_the_pipeline(remote, tiny_pipe):
    kwargs = dict(width=48, steps=3, seed=21, num_images=2, all_cfg_scale=3.5, part_cfg_scale=1.0,
                  timestep_trunc=500, flow_shift=2.0, system_prompt="Draw carefully.")
    assert same_pictures(remote.generate("a harbour", **kwargs), tiny_pipe.generate("a harbour", **kwargs))


def test_edit_with_a_callback_reports_every_step_with_a_preview(remote, tiny_pipe):
    source = fox()
    other = Image.new("RGB", (40, 30), (20, 120, 220))
    seen = []

    def callback(step, total, latents):
        seen.append((step, total, remote.decode_latents_preview(latents).mode))

    result = remote.edit([source, other], "combine", height=48, steps=3, seed=2, callback=callback)
    assert same_pictures(result, tiny_pipe.edit([source, other], "combine", height=48, steps=3, seed=2))
    assert seen == [(1, 3, "RGB"), (2, 3, "RGB"), (3, 3, "RGB")]


class Stop(Exception):
    pass


def test_callbacks_cancel_the_server_job(remote, server):
    before = server.health()["cancelled"]
    with pytest.raises(GenerationCancelled):
        remote.generate("never", width=32, steps=1000, callback=lambda step, total, _: False if step == 2 else None)
    server.wait_for(lambda h: h["cancelled"] == before + 1 and h["running"] == 0)

    def interrupt(step, total, _):
        if step == 2:
            raise Stop  # e.g. ComfyUI's interrupt: propagates unchanged

    with pytest.raises(Stop):
        remote.edit(fox(), "never", steps=1000, callback=interrupt)
    server.wait_for(lambda h: h["cancelled"] == before + 2 and h["running"] == 0)
    with pytest.raises(GenerationCancelled):
        remote.understand(None, "long", max_new_tokens=3000, min_new_tokens=3000,
                          token_callback=lambda step, total: False if step == 3 else None)
    server.wait_for(lambda h: h["cancelled"] == before + 3 and h["running"] == 0)


@pytest.mark.parametrize("call", [
    pytest.param(lambda p: p.generate("x", steps=0), id="steps"),
    pytest.param(lambda p: p.generate("x", width=0), id="width"),
    pytest.param(lambda p: p.generate("x", num_images=0), id="num-images"),
    pytest.param(lambda p: p.generate(5), id="prompt-type"),
    pytest.param(lambda p: p.generate("x", all_cfg_scale=float("nan")), id="cfg"),
    pytest.param(lambda p: p.generate("x", flow_shift=0), id="flow-shift"),
    pytest.param(lambda p: p.generate("x", system_prompt="<image> no"), id="system-prompt"),
    pytest.param(lambda p: p.generate("x", reasoning=Reasoning("t", (1,), "x", 1)), id="reasoning-images"),
    pytest.param(lambda p: p.edit([], "x"), id="no-images"),
    pytest.param(lambda p: p.edit("/no/such/file.png", "x"), id="missing-file"),
    pytest.param(lambda p: p.understand(None, "x", temperature=0, do_sample=True), id="temperature"),
    pytest.param(lambda p: p.understand(None, "x", max_new_tokens=0), id="max-new-tokens"),
    pytest.param(lambda p: p.understand(None, None), id="question-type"),
    pytest.param(lambda p: p.reason("x", seed=-1), id="seed"),
    pytest.param(lambda p: p.understand_each([], "x"), id="each-no-images"),
    pytest.param(lambda p: p.understand_each(fox(), "x", batch_size=0), id="each-batch-size"),
    pytest.param(lambda p: p.understand_each([fox(), 3], "x"), id="each-image-type"),
])
def test_bad_arguments_fail_as_in_process(remote, tiny_pipe, call):
    with pytest.raises(InternVLUError) as local:
        call(tiny_pipe)
    with pytest.raises(InternVLUError) as served:
        call(remote)
    assert type(served.value) is type(local.value) and str(served.value) == str(local.value)


def test_errors_found_by_the_server_are_invalid_input(remote, tiny_pipe):
    vocabulary = Reasoning("t", (10**9,), "x", 0)
    with pytest.raises(InvalidInputError) as local:
        tiny_pipe.generate("x", width=32, steps=1, reasoning=vocabulary)
    with pytest.raises(InvalidInputError) as served:
        remote.generate("x", width=32, steps=1, reasoning=vocabulary)
    assert str(served.value) == str(local.value)
    with pytest.raises(InvalidInputTypeError, match="seed"):
        remote.generate("x", generator=object())


def test_a_drop_in_for_the_pipeline(remote, tiny_pipe):
    """Adapter code written against the pipeline runs unchanged on the client, with the same outputs."""
    def adapter(model):
        previews = []
        thought = model.reason("a mountain", max_new_tokens=5)
        pictures = model.generate("a mountain", width=32, height=32, steps=2, seed=4, reasoning=thought,
                                  callback=lambda s, t, latents: previews.append(model.decode_latents_preview(latents)))
        answer = model.understand(pictures, "What is drawn?", max_new_tokens=5)
        return thought, pictures, answer, len(previews)

    local, served = adapter(tiny_pipe), adapter(remote)
    assert served[0] == local[0] and same_pictures(served[1], local[1]) and served[2:] == local[2:]


def test_no_key_given_sends_the_environment_one(server, monkeypatch):
    monkeypatch.setenv("INTERNVL_U_API_KEY", KEY)
    with RemoteInternVLU(server.url) as from_env:
        assert from_env.understand(None, "Hi", max_new_tokens=2) is not None
    with RemoteInternVLU(server.url, api_key="") as keyless:  # "": explicitly none
        with pytest.raises(RemoteError) as caught:
            keyless.understand(None, "Hi", max_new_tokens=2)
    assert caught.value.status_code == 401


def test_server_refusals_are_remote_errors(server):
    with RemoteInternVLU(server.url, api_key="wrong") as wrong:
        with pytest.raises(RemoteError) as caught:
            wrong.understand(None, "x", max_new_tokens=2)
    assert caught.value.status_code == 401
    with RemoteInternVLU(f"http://127.0.0.1:{server.port + 1 if server.port < 65535 else 1}", timeout=5,
                         retries=1, backoff=0) as nowhere:
        with pytest.raises(RemoteError, match="gave up after 2 attempts") as caught:
            nowhere.generate("x", steps=1)
    assert caught.value.status_code is None
    with pytest.raises(InvalidInputError, match="base_url"):
        RemoteInternVLU("127.0.0.1:8091")


def test_a_full_queue_is_a_remote_error_with_retry_after(server, remote):
    from test_serve_http import ENDLESS, held_request

    before = server.health()["cancelled"]
    with held_request(server, ENDLESS, lambda h: h["running"] == 1), \
            held_request(server, ENDLESS, lambda h: h["waiting"] == 1):
        with pytest.raises(RemoteError) as caught:
            remote.generate("x", steps=1)
    assert caught.value.status_code == 429 and caught.value.code == "queue_full" and caught.value.retry_after >= 1
    server.wait_for(lambda h: h["cancelled"] == before + 2 and h["running"] == 0)
