"""Contract with vLLM-Omni's InternVL-U dialect: its example requests and request fields, sent to
``internvl-u serve``, answered in the shapes of vLLM-Omni's own response models.

The contract (``fixtures/vllm_omni/internvlu_contract.json``) writes vLLM-Omni's protocol
definitions down as data, with the files and commits they were read from. Example sizes and step
counts are scaled down for the tiny CPU checkpoint; every field name and value type stays theirs.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import ServerProcess, data_uri, fox, png_bytes

CONTRACT = json.loads((Path(__file__).parent / "fixtures" / "vllm_omni" / "internvlu_contract.json").read_text())
SCALED = {"height": 32, "width": 48, "num_inference_steps": 2, "max_tokens": 8, "size": "48x32"}
TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "object": dict, "null": type(None)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("contract") / "server.log",
                            model_name=CONTRACT["served_model_name"]).start()
    yield process
    assert process.stop() == 0, process.log_tail()


def scaled(fields: dict) -> dict:
    """Their sizes and step counts, scaled down; form fields stay strings."""
    return {k: (str(SCALED[k]) if isinstance(v, str) else SCALED[k]) if k in SCALED else v for k, v in fields.items()}


def has_type(value, spec: str) -> bool:
    """``spec`` like ``int``, ``str|null``, ``list[ImageData]``, ``UsageInfo`` (an object)."""
    for option in spec.split("|"):
        option = option.strip()
        if option.startswith("list"):
            if isinstance(value, list):
                return True
        elif option in TYPES:
            if isinstance(value, TYPES[option]) and not (option in ("int", "float") and isinstance(value, bool)):
                return True
        elif option[:1].isupper() and isinstance(value, dict):  # a nested model
            return True
    return False


def conforms(answer: dict, model: str, extensions: tuple[str, ...] = ()) -> None:
    """``answer`` fits vLLM-Omni's ``model``: required fields present, known fields typed, nothing else but
    our documented extensions."""
    schema = CONTRACT[model]
    assert set(answer) <= set(schema) | set(extensions), f"{model}: unknown fields {set(answer) - set(schema)}"
    for name, spec in schema.items():
        if spec.get("required"):
            assert name in answer, f"{model}: missing {name}"
        if name in answer:
            assert has_type(answer[name], spec["type"]), f"{model}.{name} = {answer[name]!r} is not {spec['type']}"


def send(server: ServerProcess, example: dict) -> httpx.Response:
    if "form" in example:
        files = [(name, ("cat.png", png_bytes(fox()), "image/png")) for name in example["files"]]
        return httpx.post(f"{server.url}{example['path']}", data=scaled(example["form"]), files=files, timeout=300)
    body = scaled(example["json"])
    if example.get("image_part"):  # their client appends the image after the text, as a data: URI
        body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": data_uri(fox())}})
    return httpx.post(f"{server.url}{example['path']}", json=body, timeout=300)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("example", CONTRACT["examples"], ids=[e["name"] for e in CONTRACT["examples"]])
def test_their_examples_get_answers_in_their_response_models(server, example):
    answer = send(server, example)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    if example["kind"] == "images":
        conforms(body, "image_generation_response", extensions=("reasoning",))
        for item in body["data"]:
            conforms(item, "image_data")
        width, height = (int(v) for v in body["size"].split("x"))
        assert decoded(body["data"][0]["b64_json"]).size == (width, height) == (48, 32)
        return
    conforms(body, "chat_completion_response", extensions=("cot_output", "reasoning"))
    conforms(body["usage"], "usage_info")
    choice = body["choices"][0]
    conforms(choice, "chat_choice")
    conforms(choice["message"], "chat_message")
    content = choice["message"]["content"]
    if example["kind"] == "chat_text":
        assert isinstance(content, str)
        return
    # As their client reads it: the image_url part whose url is a data:image URI.
    urls = [part["image_url"]["url"] for part in content if isinstance(part, dict) and "image_url" in part]
    assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")
    assert decoded(urls[0].split(",", 1)[1]).size == (48, 32)


GENERATION_FIELDS = [(name, spec) for name, spec in CONTRACT["image_generation_request"].items() if "sample" in spec]
EDIT_FIELDS = [(name, spec) for name, spec in CONTRACT["image_edit_form"].items() if "sample" in spec]


@pytest.mark.parametrize(("name", "spec"), GENERATION_FIELDS, ids=[n for n, _ in GENERATION_FIELDS])
def test_every_generation_request_field_is_honoured_ignored_or_refused(server, name, spec):
    body = {"prompt": "a cat", "size": "32x32", "num_inference_steps": 1, name: spec["sample"]}
    answer = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=300)
    check_handling(answer, name, spec["ours"])


@pytest.mark.parametrize(("name", "spec"), EDIT_FIELDS, ids=[n for n, _ in EDIT_FIELDS])
def test_every_edit_form_field_is_honoured_ignored_or_refused(server, name, spec):
    form = {"prompt": "a scarf", "size": "32x32", "num_inference_steps": "1", name: spec["sample"]}
    files = [("image", ("cat.png", png_bytes(fox()), "image/png"))]
    answer = httpx.post(f"{server.url}/v1/images/edits", data=form, files=files, timeout=300)
    check_handling(answer, name, spec["ours"])


def check_handling(answer: httpx.Response, name: str, ours: str) -> None:
    if ours == "refused":
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == name
    else:
        assert answer.status_code == 200, answer.text


def test_extra_body_fields_work_at_the_top_level_and_in_extra_params(server):
    base = {"prompt": "a cat", "size": "32x32", "num_inference_steps": 2, "seed": 5}
    extras = {"all_cfg_scale": 3.0, "part_cfg_scale": 1.0, "timestep_trunc": 900, "flow_shift": 2.0}
    assert sorted(extras) == sorted(CONTRACT["extra_body_fields"])

    def pixels(body):
        answer = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=300)
        return np.asarray(decoded(answer.json()["data"][0]["b64_json"]))

    top, nested, default = pixels({**base, **extras}), pixels({**base, "extra_params": extras}), pixels(base)
    assert np.array_equal(top, nested) and not np.array_equal(top, default)
