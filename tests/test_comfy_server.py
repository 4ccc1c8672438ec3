"""The pack inside a real ComfyUI server, driven over HTTP on 127.0.0.1.

Runs only when ``COMFYUI_PATH`` points at a ComfyUI checkout (>= 0.3.48) whose Python
(``COMFYUI_PYTHON``, default: this interpreter) has ComfyUI's requirements and the pack's.
The server loads only this pack (``--disable-all-custom-nodes --whitelist-custom-nodes``), finds
the tiny checkpoint through ``extra_model_paths.yaml`` and runs every API workflow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from nodes import all_specs  # noqa: E402
from workflows.tools.core_nodes import CORE_NODES  # noqa: E402
from workflows.tools.definitions import CAPTION_FOLDER, EXAMPLE_LORA, QWEN_IMAGE_VAE  # noqa: E402

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK_NAME = "ComfyUI-InternVL-U"
TINY = ROOT / "tests" / "fixtures" / "internvlu-tiny"
#: A checkpoint with the released VAE's architecture (16 latent channels, ComfyUI loads only that
#: shape as a Qwen-Image VAE) and a tiny VLM/transformer, written by the fixture; the latent
#: hand-off workflow runs on it.
WAN_CHECKPOINT = "InternVL-U-wan"
CAPTION_NAMES = ("a_fox", "b_fox_inverted", "c_lake")
API_DIR = ROOT / "workflows" / "api"
WORKFLOW_NAMES = sorted(p.stem for p in API_DIR.glob("*.json"))
FAST = {
    "InternVLU_Understand": {"max_new_tokens": 8},
    "InternVLU_Reason": {"max_new_tokens": 8},
    "InternVLU_Generate": {"resolution": "custom (width x height)", "width": 64, "height": 64, "steps": 2},
    "InternVLU_Edit": {"steps": 2},
}

pytestmark = pytest.mark.skipif(
    not (COMFYUI_PATH and (Path(COMFYUI_PATH) / "main.py").is_file()),
    reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-server test",
)


class Server:
    """A ComfyUI process on a free loopback port, with its own input/output/model folders."""

    def __init__(self, base: Path, environment: dict[str, str]) -> None:
        self.base = base
        self.environment = environment
        self.log_path = base / "server.log"
        self.output = base / "output"
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        custom_nodes = self.base / "custom_nodes"
        models = self.base / "models" / "internvl_u"
        for folder in (custom_nodes, models, self.base / "input", self.output, self.base / "temp"):
            folder.mkdir(parents=True)
        (custom_nodes / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
        (models / "InternVL-U").symlink_to(TINY / "checkpoint", target_is_directory=True)
        shutil.copy(TINY / "inputs" / "img_fox_80x60.png", self.base / "input" / "example.png")
        write_caption_folder(self.base / "input" / CAPTION_FOLDER)
        vae_dir = self.base / "models" / "vae"
        write_wan_checkpoint(models / WAN_CHECKPOINT, vae_dir / QWEN_IMAGE_VAE)
        loras = self.base / "models" / "internvl_u_loras"
        loras.mkdir()
        write_test_lora(loras / EXAMPLE_LORA)
        config = self.base / "extra_model_paths.yaml"
        config.write_text(
            f"internvlu_test:\n    custom_nodes: {custom_nodes}\n    internvl_u: {models}\n    vae: {vae_dir}\n"
            f"    internvl_u_loras: {loras}\n"
        )
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [
            COMFYUI_PYTHON,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-auto-launch",
            "--database-url",
            "sqlite:///:memory:",
            "--input-directory",
            str(self.base / "input"),
            "--output-directory",
            str(self.output),
            "--temp-directory",
            str(self.base / "temp"),
            "--extra-model-paths-config",
            str(config),
            "--disable-api-nodes",
            "--disable-all-custom-nodes",
            "--whitelist-custom-nodes",
            PACK_NAME,
            "--preview-method",
            "auto",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.environment})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def queue(self, prompt: dict[str, Any], client_id: str | None = None) -> str:
        status, reply = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        assert status == 200, reply
        assert reply["node_errors"] == {}
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.log()[-4000:]}")


def write_caption_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    fox = Image.open(TINY / "inputs" / "img_fox_80x60.png").convert("RGB")
    lake = Image.open(TINY / "inputs" / "img_lake_70x70.png").convert("RGB")
    for name, picture in zip(CAPTION_NAMES, (fox, ImageOps.invert(fox), lake)):
        picture.save(folder / f"{name}.png")


def write_test_lora(path: Path) -> None:
    """An adapter for the tiny checkpoint (what the LoRA workflow's node picks)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import get_pipeline
    from lora_helpers import dit_adapter

    dit_adapter(get_pipeline("internvlu-tiny"), path)


def write_wan_checkpoint(checkpoint: Path, comfy_vae: Path) -> None:
    """A random checkpoint whose VAE has the released (Wan 2.1) shape, and that VAE in ComfyUI's format."""
    import torch
    from safetensors.torch import load_file, save_file

    from internvl_u_core.random_checkpoint import write_random_checkpoint

    write_random_checkpoint(
        checkpoint, processor_source=TINY / "checkpoint", vit_layers=1, llm_layers=1, dit_layers=1,
        vision={"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 56},
        llm={"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "vocab_size": 420, "max_position_embeddings": 2048},
        decoder={"attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 128,
                 "in_channels": 64, "out_channels": 16, "axes_dims_rope": [4, 6, 6]},
        generation={"gen_image_height": 64, "gen_image_width": 64}, seed=1,
    )
    config = json.loads((checkpoint / "vae" / "config.json").read_text())
    state = load_file(str(checkpoint / "vae" / "diffusion_pytorch_model.safetensors"))
    comfy_vae.parent.mkdir(parents=True)
    save_file({comfy_vae_key(k, config["num_res_blocks"]): v.to(torch.float32) for k, v in state.items()},
              str(comfy_vae))


_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma",
           "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}


def comfy_vae_key(key: str, num_res_blocks: int) -> str:
    """A diffusers ``AutoencoderKLQwenImage`` key in the original Wan 2.1 layout ComfyUI loads."""
    def resnet(prefix: str, rest: str) -> str:
        for old, new in _RESNET.items():
            if rest.startswith(old):
                return prefix + new + rest[len(old):]
        return prefix + rest  # resample / time_conv keep their names

    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    part, rest = key.split(".", 1)
    rest = rest.replace("conv_in.", "conv1.").replace("conv_out.", "head.2.").replace("norm_out.gamma", "head.0.gamma")
    if match := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", rest):
        kind, index, tail = match.groups()
        if kind == "attentions":
            return f"{part}.middle.1.{tail}"
        return resnet(f"{part}.middle.{2 * int(index)}.", tail)
    if match := re.match(r"down_blocks\.(\d+)\.(.*)", rest):
        return resnet(f"{part}.downsamples.{match.group(1)}.", match.group(2))
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", rest):
        block, kind, index, tail = match.groups()
        flat = int(block) * (num_res_blocks + 2) + (int(index) if kind == "resnets" else num_res_blocks + 1)
        return resnet(f"{part}.upsamples.{flat}.", tail)
    return f"{part}.{rest}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fast_prompt(name: str, **changes: dict[str, Any]) -> dict[str, Any]:
    prompt = json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))
    for node in prompt.values():
        for key, value in {**FAST.get(node["class_type"], {}), **changes.get(node["class_type"], {})}.items():
            if not isinstance(node["inputs"].get(key), list):
                node["inputs"][key] = value
    return prompt


def _node(prompt: dict[str, Any], class_type: str) -> str:
    return next(i for i, n in prompt.items() if n["class_type"] == class_type)


def _saves(prompt: dict[str, Any]) -> dict[str, str]:
    """The SaveImage node of each node whose images are saved."""
    return {n["inputs"]["images"][0]: i for i, n in prompt.items() if n["class_type"] == "SaveImage"}


def point_at(prompt: dict[str, Any], served: Any) -> dict[str, Any]:
    """The prompt with every Remote Loader's base_url set to the test server."""
    for node in prompt.values():
        if node["class_type"] == "InternVLU_RemoteLoader":
            node["inputs"]["base_url"] = served.url
    return prompt


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, served: Any) -> Server:
    """ComfyUI, with the key of the test's `internvl-u serve` (conftest's ``served``, run by this Python)
    where the Remote Loader looks for it."""
    instance = Server(tmp_path_factory.mktemp("comfyui"), {"INTERNVL_U_API_KEY": served.api_key})
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


def test_pack_loads_cleanly(server: Server) -> None:
    log = server.log()
    pack_lines = [line for line in log.splitlines() if PACK_NAME in line]
    assert any("seconds" in line for line in pack_lines), "pack missing from import times"
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Error" in line]


def test_object_info_lists_every_node(server: Server) -> None:
    info = server.get("/object_info")
    for spec in all_specs():
        node = info[spec.node_id]
        assert node["category"] == "InternVL-U"
        assert node["display_name"] == spec.display_name
        assert node["output"] == [o.type for o in spec.outputs]
        assert node["output_name"] == [o.name for o in spec.outputs]
        assert node["output_tooltips"] == [o.tooltip for o in spec.outputs]
        assert node["output_is_list"] == [o.is_list for o in spec.outputs]
        served = {**node["input"]["required"], **node["input"].get("optional", {})}
        for inp in spec.inputs:
            kind, options = served[inp.name][0], served[inp.name][1]
            assert options.get("tooltip") == inp.tooltip
            if inp.type == "COMBO":
                choices = kind if isinstance(kind, list) else options["options"]
                assert choices == inp.option_list() or inp.name in ("checkpoint", "lora_name")  # the server's folders
            else:
                assert kind == inp.type
    assert "InternVL-U" in info["InternVLU_Loader"]["input"]["required"]["checkpoint"][1].get(
        "options", info["InternVLU_Loader"]["input"]["required"]["checkpoint"][0]
    )
    lora_name = info["InternVLU_LoRA"]["input"]["required"]["lora_name"]
    assert EXAMPLE_LORA in lora_name[1].get("options", lora_name[0])  # models/internvl_u_loras is listed
    for name, core in CORE_NODES.items():  # the table the workflow tests rely on
        node = info[name]
        order = node["input_order"]["required"] + node["input_order"].get("optional", [])
        assert order == [n for n, _ in core["inputs"]]
        assert node["output"][: len(core["outputs"])] == [t for _, t in core["outputs"]]


def test_frontend_assets_and_templates_are_served(server: Server) -> None:
    assert any(path.endswith("/internvlu_text.js") for path in server.get("/extensions"))
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK_NAME]) == WORKFLOW_NAMES  # workflows/ui|api are not listed
    for name in WORKFLOW_NAMES:
        for suffix in (".json", ".jpg"):
            url = f"{server.url}/api/workflow_templates/{PACK_NAME}/{name}{suffix}"
            with urllib.request.urlopen(url, timeout=30) as response:
                assert response.status == 200


def test_seed_widgets_keep_their_control_mode(server: Server) -> None:
    info = server.get("/object_info")
    assert info["InternVLU_Generate"]["input"]["required"]["seed"][1]["control_after_generate"] == "randomize"
    assert info["InternVLU_Understand"]["input"]["required"]["seed"][1]["control_after_generate"] == "fixed"


#: Per-workflow changes for the test: the latent hand-off runs on the 16-channel checkpoint.
CHANGES = {
    "internvlu_latent_vae_decode": {
        "InternVLU_Loader": {"checkpoint": WAN_CHECKPOINT},
        "InternVLU_Generate": {"width": 64, "height": 48},
    },
}


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_api_workflow_completes(server: Server, served: Any, name: str) -> None:
    prompt = point_at(fast_prompt(name, **CHANGES.get(name, {})), served)
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    outputs = entry["outputs"]
    for node_id, node in prompt.items():
        kind = node["class_type"]
        if kind in ("InternVLU_Understand", "InternVLU_Reason"):
            texts = outputs[node_id]["text"]
            assert len(texts) == 1 and isinstance(texts[0], str) and texts[0]
        if kind == "SaveImage":
            images = outputs[node_id]["images"]
            assert images and all(i["type"] == "output" for i in images)
            for image in images:
                assert (server.output / image["subfolder"] / image["filename"]).is_file()


def _saved(server: Server, entry: dict[str, Any], node_id: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(server.output / i["subfolder"] / i["filename"]).convert("RGB"), dtype=np.int16)
        for i in entry["outputs"][node_id]["images"]
    ]


def test_generate_latent_decoded_by_comfyui_vae_decode_matches_our_image(server: Server) -> None:
    """Generate's LATENT through ComfyUI's own VAELoader + VAE Decode (qwen_image_vae.safetensors in
    ComfyUI's key layout) gives Generate's own image within 2 levels."""
    prompt = fast_prompt("internvlu_latent_vae_decode", **CHANGES["internvlu_latent_vae_decode"])
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    saves = _saves(prompt)
    decode, generate = _node(prompt, "VAEDecode"), _node(prompt, "InternVLU_Generate")
    (ours,), (comfy,) = _saved(server, entry, saves[generate]), _saved(server, entry, saves[decode])
    assert ours.shape == comfy.shape == (48, 64, 3)
    assert ours.std() > 5  # a real picture, not a saturated or flat one
    assert np.abs(ours - comfy).max() <= 2


def test_caption_workflow_writes_one_txt_per_image(server: Server) -> None:
    prompt = fast_prompt("internvlu_caption_folder")
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    folder = server.output / "captions"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{name}{suffix}" for name in CAPTION_NAMES for suffix in (".png", ".txt")
    )
    understand = _node(prompt, "InternVLU_Understand")
    (shown,) = entry["outputs"][understand]["text"]  # every answer, in image order
    captions = [(folder / f"{name}.txt").read_text(encoding="utf-8").strip() for name in CAPTION_NAMES]
    position = 0
    for caption in captions:
        position = shown.index(caption, position) + len(caption)


def test_interrupt_stops_a_running_generation(server: Server) -> None:
    server.wait(server.queue(fast_prompt("internvlu_text_to_image")))  # model loaded and cached
    # Many steps at a larger size: long enough to be caught mid-run on any machine.
    long_run = fast_prompt("internvlu_text_to_image",
                           InternVLU_Generate={"steps": 200, "seed": 5, "width": 512, "height": 512})
    prompt_id = server.queue(long_run)
    deadline = time.monotonic() + 60
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    server.post("/interrupt", {})
    entry = server.wait(prompt_id, timeout=60)
    events = {event: data for event, data in entry["status"]["messages"]}
    assert "execution_interrupted" in events, entry["status"]
    generate_node = _node(long_run, "InternVLU_Generate")
    assert events["execution_interrupted"]["node_id"] == generate_node
    again = server.wait(server.queue(fast_prompt("internvlu_image_qa")))
    assert again["status"]["status_str"] == "success"


def _local(prompt: dict[str, Any]) -> dict[str, Any]:
    """The prompt with the Remote Loader swapped for the shipped workflows' Loader (same node id)."""
    local = json.loads(json.dumps(prompt))
    shipped = fast_prompt("internvlu_text_to_image")
    local[_node(local, "InternVLU_RemoteLoader")] = shipped[_node(shipped, "InternVLU_Loader")]
    return local


def test_remote_workflow_gives_the_local_results(server: Server, served: Any, tiny_pipe: Any) -> None:
    """The served-model workflow: every text and pixel equals the core's in-process result (the server's
    Python and thread count), and the same workflow on the Loader in this ComfyUI."""
    prompt = point_at(fast_prompt("internvlu_remote_server"), served)
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    reason, generate, understand, edit = (_node(prompt, f"InternVLU_{kind}")
                                          for kind in ("Reason", "Generate", "Understand", "Edit"))
    saves = _saves(prompt)
    texts = {node: entry["outputs"][node]["text"][0] for node in (reason, understand)}
    pictures = {node: _saved(server, entry, saves[node]) for node in (generate, edit)}

    def inputs(node: str) -> dict[str, Any]:
        return prompt[node]["inputs"]

    def text_kwargs(node: str) -> dict[str, Any]:
        return {k: inputs(node)[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams", "seed")}

    def draw_kwargs(node: str) -> dict[str, Any]:
        return {"steps": inputs(node)["steps"], "seed": inputs(node)["seed"], "num_images": inputs(node)["batch_size"]}

    thought = tiny_pipe.reason(inputs(reason)["prompt"], **text_kwargs(reason))
    drawn = tiny_pipe.generate(inputs(reason)["prompt"], reasoning=thought, width=inputs(generate)["width"],
                               height=inputs(generate)["height"], **draw_kwargs(generate))
    fox = Image.open(TINY / "inputs" / "img_fox_80x60.png").convert("RGB")
    edited = tiny_pipe.edit([fox], inputs(edit)["instruction"], **draw_kwargs(edit))
    assert texts[reason] == thought.text
    assert texts[understand] == tiny_pipe.understand(drawn, inputs(understand)["question"], **text_kwargs(understand))
    for node, expected in ((generate, drawn), (edit, edited)):
        assert [p.shape for p in pictures[node]] == [(e.height, e.width, 3) for e in expected]
        assert all(np.array_equal(p, np.asarray(e, dtype=np.int16)) for p, e in zip(pictures[node], expected))

    local = server.wait(server.queue(_local(prompt)))
    assert local["status"]["status_str"] == "success", local["status"]["messages"]
    assert {node: local["outputs"][node]["text"][0] for node in (reason, understand)} == texts
    for node in (generate, edit):
        assert all(np.array_equal(a, b) for a, b in zip(_saved(server, local, saves[node]), pictures[node]))


def test_lora_branch_and_base_branch_in_one_graph(server: Server, tiny_pipe: Any) -> None:
    """The LoRA workflow: the base branch draws the base model's image exactly, the LoRA branch the adapter's
    (as pipe.load_lora gives it); strength 0 gives the base image back."""
    prompt = fast_prompt("internvlu_lora_generate")
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    saves = _saves(prompt)
    generates = [i for i, n in prompt.items() if n["class_type"] == "InternVLU_Generate"]
    with_lora, base = sorted(generates, key=lambda i: prompt[i]["inputs"]["model"][0] == _node(prompt, "InternVLU_Loader"))
    inputs = prompt[base]["inputs"]
    kwargs = {"width": inputs["width"], "height": inputs["height"], "steps": inputs["steps"], "seed": inputs["seed"]}
    expected_base = np.asarray(tiny_pipe.generate(inputs["prompt"], **kwargs)[0], dtype=np.int16)
    tiny_pipe.load_lora(server.base / "models" / "internvl_u_loras" / EXAMPLE_LORA)
    try:
        expected_lora = np.asarray(tiny_pipe.generate(inputs["prompt"], **kwargs)[0], dtype=np.int16)
    finally:
        tiny_pipe.remove_lora()
    (got_base,), (got_lora,) = _saved(server, entry, saves[base]), _saved(server, entry, saves[with_lora])
    assert np.array_equal(got_base, expected_base)
    assert np.array_equal(got_lora, expected_lora) and not np.array_equal(got_lora, got_base)

    prompt[_node(prompt, "InternVLU_LoRA")]["inputs"]["strength"] = 0.0
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    assert np.array_equal(_saved(server, entry, saves[with_lora])[0], expected_base)


def _progress_until_done(socket: Any, prompt_id: str) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """Progress ticks per node and the number of preview frames ComfyUI sent for ``prompt_id``."""
    ticks: dict[str, list[tuple[int, int]]] = {}
    previews = 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        message = socket.recv(timeout=60)
        if isinstance(message, bytes):
            previews += int.from_bytes(message[:4], "big") in (1, 4)  # PREVIEW_IMAGE (with metadata)
            continue
        event = json.loads(message)
        data = event.get("data", {})
        if data.get("prompt_id") != prompt_id:
            continue
        if event["type"] == "progress":
            ticks.setdefault(data["node"], []).append((data["value"], data["max"]))
        if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            return ticks, previews
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def _is_progress_of(message: str | bytes, node: str) -> bool:
    if isinstance(message, bytes):
        return False
    event = json.loads(message)
    return event["type"] == "progress" and event["data"].get("node") == node


def test_remote_progress_previews_and_cancel(server: Server, served: Any) -> None:
    """Through ComfyUI's websocket: a tick per denoising step (with a preview) and per token; Cancel
    closes the stream and the server cancels its job."""
    from websockets.sync.client import connect

    client_id = uuid.uuid4().hex
    prompt = point_at(fast_prompt("internvlu_remote_server", InternVLU_Generate={"steps": 3}), served)
    generate, understand = _node(prompt, "InternVLU_Generate"), _node(prompt, "InternVLU_Understand")
    with connect(f"ws://{server.url.removeprefix('http://')}/ws?clientId={client_id}") as socket:
        ticks, previews = _progress_until_done(socket, server.queue(prompt, client_id))
        assert ticks[generate] == [(1, 3), (2, 3), (3, 3)]
        assert ticks[_node(prompt, "InternVLU_Edit")] == [(1, 2), (2, 2)]
        assert previews == 5  # the server's preview of every denoising step, Generate's and Edit's
        for node in (understand, _node(prompt, "InternVLU_Reason")):  # token by token (newer cores skip some)
            assert ticks[node][0] == (1, 8) and ticks[node][-1] == (8, 8)

        before = served.health()["cancelled"]
        long_run = point_at(fast_prompt("internvlu_remote_server", InternVLU_Generate={"steps": 1000}), served)
        prompt_id = server.queue(long_run, client_id)
        while not _is_progress_of(socket.recv(timeout=120), generate):
            pass
        server.post("/interrupt", {})
        entry = server.wait(prompt_id, timeout=60)
    events = {event: data for event, data in entry["status"]["messages"]}
    assert events["execution_interrupted"]["node_id"] == generate
    served.wait_for(lambda health: health["cancelled"] == before + 1 and health["running"] == 0)


def _loads(server: Server) -> int:
    return server.log().count("Requested to load PipelineModules")


def test_unload_models_unregisters_and_the_next_run_reloads(server: Server) -> None:
    """ComfyUI's "Unload models" reaches our ModelPatcher; the cached loader output still works."""
    server.wait(server.queue(fast_prompt("internvlu_edit")))
    loads = _loads(server)
    assert server.post("/free", {"unload_models": True})[0] == 200
    time.sleep(2.0)  # let the worker apply the flag before the next prompt arrives (it may be in a gc pass)
    entry = server.wait(server.queue(fast_prompt("internvlu_edit", InternVLU_Edit={"seed": 98})))
    assert entry["status"]["status_str"] == "success"
    assert _loads(server) == loads + 1  # unloaded by ComfyUI, so loaded again


def test_free_memory_drops_the_model_and_the_next_run_reloads(server: Server) -> None:
    loads = server.log().count("InternVL-U: loading")
    assert server.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
    time.sleep(2.0)
    entry = server.wait(server.queue(fast_prompt("internvlu_edit", InternVLU_Edit={"seed": 99})))
    assert entry["status"]["status_str"] == "success"
    assert server.log().count("InternVL-U: loading") == loads + 1  # read from disk again


# Runs inside ComfyUI's Python with ComfyUI importable (no server): the pack's ModelPatcher and
# interrupt path against that version's model_management.
PATCHER_PROBE = """
import importlib.util, json, sys
comfy_path, root, tiny = sys.argv[1:4]
sys.path.insert(0, comfy_path)
from comfy.cli_args import args
args.cpu = True
import torch
import comfy.model_management as mm
import comfy.model_patcher as mp
spec = importlib.util.spec_from_file_location("internvlu_pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["internvlu_pack"] = pack
spec.loader.exec_module(pack)
from internvlu_pack.nodes import all_specs
from internvlu_pack.nodes.model_handle import LoadSettings, get_model
specs = {s.node_id: s for s in all_specs()}
handle = get_model(LoadSettings(tiny, "fp32", "cpu"))
handle.pipeline()
patcher = handle.patcher
report = {"patcher": type(patcher).__name__,
          "partially_unload": patcher.partially_unload(torch.device("cpu"), 1 << 20, force_patch_weights=True),
          "interrupt_is_exception": issubclass(mm.InterruptProcessingException, Exception)}
if hasattr(mp, "is_model_patcher_output"):  # newer cores evict such loader outputs first under RAM pressure
    report["evictable_like_core_loaders"] = mp.is_model_patcher_output(handle)
run = dict(model=handle, prompt="a tree", resolution="custom (width x height)", width=32, height=32, steps=3,
           all_cfg_scale=0.0, part_cfg_scale=0.0, seed=1, batch_size=1)
first = specs["InternVLU_Generate"].run(**run).values[0]
mm.interrupt_current_processing(True)
try:
    specs["InternVLU_Generate"].run(**run)
    report["interrupted"] = None
except BaseException as error:
    report["interrupted"] = type(error).__name__
report["same_after_interrupt"] = bool(torch.equal(specs["InternVLU_Generate"].run(**run).values[0], first))
import comfy.latent_formats as formats
from internvlu_pack.internvl_u_core import sampling
report["previews_use_comfyui_wan21_table"] = (
    torch.equal(torch.tensor(formats.Wan21.latent_rgb_factors), torch.tensor(sampling.WAN21_RGB_FACTORS))
    and torch.equal(torch.tensor(formats.Wan21.latent_rgb_factors_bias), torch.tensor(sampling.WAN21_RGB_BIAS)))
print(json.dumps(report))
"""


def test_model_patcher_and_interrupt_match_this_comfyui() -> None:
    done = subprocess.run(
        [COMFYUI_PYTHON, "-c", PATCHER_PROBE, COMFYUI_PATH, str(ROOT), str(TINY / "checkpoint")],
        capture_output=True, text=True, timeout=300, cwd=COMFYUI_PATH,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["patcher"] == "InternVLUModelPatcher"
    assert report["partially_unload"] == 0  # all-or-nothing: ComfyUI then unloads it whole
    assert report["interrupted"] == "InterruptProcessingException"  # not swallowed, whatever its base class
    assert report["same_after_interrupt"]
    assert report.get("evictable_like_core_loaders", True)
    assert report["previews_use_comfyui_wan21_table"]  # the core's copy, which previews use, is ComfyUI's
