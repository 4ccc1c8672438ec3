"""Adapters through the agent toolkit: only the operator's list, by name; the base model between jobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lora_helpers import dit_adapter, pixels
from PIL import Image

pytest.importorskip("langchain_core")

from agent_tools import InternVLUToolkit  # noqa: E402

FAST = {"width": 32, "height": 32, "steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pipe(pipe_without_loras):
    return pipe_without_loras


def _call(kit: InternVLUToolkit, name: str, **args):
    tool = next(t for t in kit.get_tools() if t.name == name)
    return tool.invoke({"name": name, "args": args, "id": "call_1", "type": "tool_call"})


def test_the_agent_names_adapters_from_the_operators_list(pipe, tmp_path: Path) -> None:
    style = dit_adapter(pipe, tmp_path / "style.safetensors", seed=3)
    kit = InternVLUToolkit(model=pipe, output_dir=tmp_path / "out", loras={"watercolour": style})
    generate = next(t for t in kit.get_tools() if t.name == "generate_image")
    assert "watercolour" in generate.description and str(style) not in generate.description

    base = pixels(pipe.generate("a fox", seed=4, **FAST))
    drawn = _call(kit, "generate_image", prompt="a fox", seed=4, loras=[{"name": "watercolour", "scale": 0.7}], **FAST)
    assert drawn.status == "success", drawn.content
    pipe.load_lora(style, adapter_name="check", scale=0.7)
    expected = pixels(pipe.generate("a fox", seed=4, **FAST))
    pipe.remove_lora("check")
    got = pixels([Image.open(drawn.artifact["images"][0]["path"])])
    assert np.array_equal(got, expected) and not np.array_equal(got, base)
    # The next job without loras is the base model again.
    plain = _call(kit, "generate_image", prompt="a fox", seed=4, **FAST)
    assert np.array_equal(pixels([Image.open(plain.artifact["images"][0]["path"])]), base)


def test_names_outside_the_list_and_paths_are_refused(pipe, tmp_path: Path) -> None:
    style = dit_adapter(pipe, tmp_path / "style.safetensors")
    kit = InternVLUToolkit(model=pipe, output_dir=tmp_path / "out", loras={"style": style})
    for name in ("../style.safetensors", "other"):
        refused = _call(kit, "generate_image", prompt="a fox", loras=[{"name": name}], **FAST)
        assert refused.status == "error" and "choose from: style" in refused.content
    with pytest.raises(ValueError, match="not a .safetensors file"):
        InternVLUToolkit(model=pipe, output_dir=tmp_path / "out", loras={"x": tmp_path / "missing.safetensors"})
    with pytest.raises(ValueError, match="served model"):
        InternVLUToolkit(model="http://127.0.0.1:9", output_dir=tmp_path / "out", loras={"style": style})


def test_the_server_takes_lora_only_from_its_lora_dirs(pipe, tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    import base64
    import io

    from starlette.testclient import TestClient

    from internvl_u_serve.http.app import OpenAIServer
    from internvl_u_serve.http.engine import Engine
    from internvl_u_serve.http.protocol import ServerSettings

    folder = tmp_path / "loras"
    folder.mkdir()
    style = dit_adapter(pipe, folder / "style.safetensors", seed=6)
    outside = dit_adapter(pipe, tmp_path / "outside.safetensors", seed=7)
    engine = Engine(pipe)
    settings = ServerSettings(model_name="tiny", limits=pipe.limits, lora_dirs=(folder,))
    client = TestClient(OpenAIServer(engine, settings).app)
    body = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 2, "seed": 4}

    def draw(**extra):
        reply = client.post("/v1/images/generations", json=body | extra)
        if reply.status_code != 200:
            return reply.status_code, reply.json()["error"]["message"]
        data = base64.b64decode(reply.json()["data"][0]["b64_json"])
        return 200, pixels([Image.open(io.BytesIO(data)).convert("RGB")])

    try:
        status, base = draw()
        assert status == 200
        status, styled = draw(lora={"name": "style", "scale": 0.5})
        assert status == 200 and not np.array_equal(styled, base)
        pipe.load_lora(style, adapter_name="check", scale=0.5)
        expected = pixels(pipe.generate("a fox", width=32, height=32, steps=2, seed=4))
        pipe.remove_lora("check")
        assert np.array_equal(styled, expected)
        assert np.array_equal(draw(lora=[{"path": "style.safetensors", "scale": 0.5}])[1], styled)
        assert np.array_equal(draw()[1], base), "a request without lora gets the base model"
        for hostile in ({"path": str(outside)}, {"path": "../outside.safetensors"}, {"name": "../outside"},
                        {"name": "missing"}, {"name": "style", "scale": 99}, "style"):
            status, message = draw(lora=hostile)
            assert status == 400 and "lora" in message, (hostile, message)
        no_dirs = TestClient(OpenAIServer(engine, ServerSettings(model_name="tiny", limits=pipe.limits)).app)
        reply = no_dirs.post("/v1/images/generations", json=body | {"lora": {"name": "style"}})
        assert reply.status_code == 400 and "--lora-dir" in reply.json()["error"]["message"]
    finally:
        engine.drain(0)


def test_the_mcp_server_offers_only_the_operators_adapters(pipe, tmp_path: Path) -> None:
    pytest.importorskip("mcp")
    import anyio
    from mcp.client import Client

    from internvl_u_core import InvalidInputError
    from internvl_u_serve.mcp.server import build_server

    style = dit_adapter(pipe, tmp_path / "style.safetensors", seed=8)
    server = build_server(pipe, tmp_path / "out", loras={"ink": style})

    async def calls():
        async with Client(server) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            styled = await client.call_tool("generate_image", {"prompt": "a fox", "seed": 4, **FAST,
                                                               "loras": [{"name": "ink", "scale": 0.5}]})
            refused = await client.call_tool("generate_image", {"prompt": "a fox", **FAST,
                                                                "loras": [{"name": str(style)[:60]}]})
            return tools, styled, refused

    tools, styled, refused = anyio.run(calls)
    assert "ink" in str(tools["generate_image"].input_schema) and str(style) not in str(tools["edit_image"].input_schema)
    assert not styled.is_error and refused.is_error and "choose from: ink" in refused.content[0].text
    saved = Path(styled.structured_content["images"][0]["path"])
    pipe.load_lora(style, adapter_name="check", scale=0.5)
    expected = pixels(pipe.generate("a fox", seed=4, **FAST))
    pipe.remove_lora("check")
    assert np.array_equal(pixels([Image.open(saved)]), expected)
    assert not pipe.loras.describe(), "the base model between jobs"
    with pytest.raises(InvalidInputError, match="not a .safetensors file"):
        build_server(pipe, tmp_path / "out", loras={"x": tmp_path / "nope.safetensors"})
