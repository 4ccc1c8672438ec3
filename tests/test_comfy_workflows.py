"""The shipped workflows, executed node by node through the pack's nodes on the tiny checkpoint.

The executor follows ComfyUI's API-format semantics: inputs are widget values or links
``[node_id, output_index]``; only nodes an output node depends on run; each runs once; widget
values are validated like the server does. ComfyUI itself is not needed: its core nodes used by
the workflows (LoadImage, SaveImage, ...) are replaced by tiny local equivalents. Results are
compared with the core pipeline called directly with the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import get_pipeline  # noqa: E402
from lora_helpers import dit_adapter  # noqa: E402

from nodes import all_specs  # noqa: E402
from nodes.schema import NodeResult, NodeSpec, list_rows  # noqa: E402
from workflows.tools.core_nodes import CORE_NODES, VIRTUAL_NODES  # noqa: E402
from workflows.tools.definitions import CAPTION_FOLDER, EXAMPLE_LORA  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "internvlu-tiny"
API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "workflows" / "ui"
TEMPLATE_DIR = ROOT / "example_workflows"
WORKFLOW_NAMES = sorted(p.stem for p in API_DIR.glob("*.json"))
SPECS: dict[str, NodeSpec] = {spec.node_id: spec for spec in all_specs()}

#: Small sizes for CPU test runs; the workflow files keep their real defaults.
FAST = {
    "InternVLU_Understand": {"max_new_tokens": 8},
    "InternVLU_Reason": {"max_new_tokens": 8},
    "InternVLU_Generate": {"resolution": "custom (width x height)", "width": 64, "height": 64, "steps": 2},
    "InternVLU_Edit": {"steps": 2},
}
EXAMPLE_SOURCE = TINY / "inputs" / "img_fox_80x60.png"


def load_api(name: str) -> dict[str, Any]:
    return json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))


def load_ui(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def fast_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    """The prompt with the test-size widget values (links are left alone)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        for key, value in FAST.get(node["class_type"], {}).items():
            if not isinstance(node["inputs"].get(key), list):
                node["inputs"][key] = value
    return prompt


# --- local stand-ins for the ComfyUI core nodes the workflows use ---------------------------


class CoreNodes:
    """Minimal equivalents of LoadImage, SaveImage, PreviewImage, ImageInvert, ImageBatch, VAELoader
    and VAEDecode (decoding with the loaded pipeline's VAE: ComfyUI's own decode is checked by
    test_comfy_latents.py against a real ComfyUI)."""

    def __init__(self, input_dir: Path, pipe: Any) -> None:
        self.input_dir = input_dir
        self.pipe = pipe

    def VAELoader(self, vae_name: str) -> NodeResult:
        return NodeResult((self.pipe,))

    def VAEDecode(self, samples: dict[str, torch.Tensor], vae: Any) -> NodeResult:
        return NodeResult((pil_tensor(vae.decode_latents(vae.from_vae_latents(samples["samples"]))),))

    def LoadImage(self, image: str) -> NodeResult:
        picture = Image.open(self.input_dir / image).convert("RGB")
        tensor = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]
        return NodeResult((tensor, torch.zeros((1, 64, 64))))

    def SaveImage(self, images: torch.Tensor, filename_prefix: str) -> NodeResult:
        return NodeResult(())

    def PreviewImage(self, images: torch.Tensor) -> NodeResult:
        return NodeResult(())

    def ImageInvert(self, image: torch.Tensor) -> NodeResult:
        return NodeResult((1.0 - image,))

    def ImageBatch(self, image1: torch.Tensor, image2: torch.Tensor) -> NodeResult:
        if image1.shape[1:] != image2.shape[1:]:
            image2 = torch.nn.functional.interpolate(
                image2.movedim(-1, 1), size=image1.shape[1:3], mode="bilinear"
            ).movedim(1, -1)
        return NodeResult((torch.cat((image1, image2)),))


def validate_widget(spec: NodeSpec, name: str, value: Any) -> None:
    """The server-side checks ComfyUI applies to widget values."""
    inp = spec.input(name)
    if inp.type == "COMBO":
        assert value in inp.option_list(), f"{spec.node_id}.{name}: {value!r} not in list"
    if inp.type in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
        assert inp.min is None or value >= inp.min, f"{spec.node_id}.{name} below min"
        assert inp.max is None or value <= inp.max, f"{spec.node_id}.{name} above max"
    if inp.type == "INT":
        assert isinstance(value, int)
    if inp.type == "BOOLEAN":
        assert isinstance(value, bool)
    if inp.type == "STRING":
        assert isinstance(value, str)


class Executor:
    """Runs an API-format prompt: the outputs' dependencies, each node once, links resolved.

    Values travel as lists, as in ComfyUI: a node without ``is_input_list`` runs once per row of its
    inputs (shorter lists repeat their last item) and list outputs are concatenated.
    """

    def __init__(self, core_nodes: CoreNodes) -> None:
        self.core_nodes = core_nodes

    def run(self, prompt: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """node id -> {"outputs": one list per output slot, "text": [shown texts], "class_type": str}."""
        results: dict[str, dict[str, Any]] = {}
        for node_id, node in prompt.items():
            if self._is_output_node(node["class_type"]):
                self._evaluate(prompt, node_id, results)
        return results

    @staticmethod
    def _is_output_node(class_type: str) -> bool:
        if class_type in SPECS:
            return SPECS[class_type].output_node
        return CORE_NODES[class_type].get("output_node", False)

    def _evaluate(self, prompt: dict, node_id: str, results: dict) -> list[list[Any]]:
        if node_id in results:
            return results[node_id]["outputs"]
        node = prompt[node_id]
        inputs: dict[str, list[Any]] = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source, slot = value
                inputs[name] = self._evaluate(prompt, str(source), results)[slot]
            else:
                inputs[name] = [value]
        class_type = node["class_type"]
        spec = SPECS.get(class_type)
        if spec is not None:
            for inp in spec.inputs:
                assert inp.optional or inp.name in inputs, f"{class_type}: missing {inp.name}"
            for name, value in node["inputs"].items():
                if not isinstance(value, list):
                    validate_widget(spec, name, value)
        calls = [inputs] if spec is not None and spec.input_is_list else list_rows(inputs)
        slots = len(spec.outputs) if spec is not None else len(CORE_NODES[class_type]["outputs"])
        is_list = [o.is_list for o in spec.outputs] if spec is not None else [False] * slots
        outputs: list[list[Any]] = [[] for _ in range(slots)]
        texts: list[str] = []
        for call in calls:
            result = spec.run(**call) if spec is not None else getattr(self.core_nodes, class_type)(**call)
            assert len(result.values) == slots
            for slot, value in enumerate(result.values):
                outputs[slot] += value if is_list[slot] else [value]
            if result.text is not None:
                texts.append(result.text)
        results[node_id] = {"outputs": outputs, "text": texts, "class_type": class_type}
        return outputs


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A models/internvl_u folder holding the tiny checkpoint and an input folder."""
    base = tmp_path_factory.mktemp("comfy")
    models = base / "models" / "internvl_u"
    models.mkdir(parents=True)
    (models / "InternVL-U").symlink_to(TINY / "checkpoint", target_is_directory=True)
    inputs = base / "input"
    inputs.mkdir()
    shutil.copy(EXAMPLE_SOURCE, inputs / "example.png")
    make_caption_folder(inputs / CAPTION_FOLDER)
    patch = pytest.MonkeyPatch()
    patch.setenv("INTERNVLU_MODELS_DIR", str(models))
    patch.setenv("INTERNVLU_INPUT_DIR", str(inputs))
    patch.setenv("INTERNVLU_OUTPUT_DIR", str(base / "output"))
    loras = base / "models" / "internvl_u_loras"
    loras.mkdir()
    dit_adapter(get_pipeline("internvlu-tiny"), loras / EXAMPLE_LORA)
    patch.setenv("INTERNVLU_LORAS_DIR", str(loras))
    yield {"models": models, "input": inputs, "output": base / "output", "loras": loras}
    patch.undo()


CAPTION_NAMES = ("a_fox", "b_lake", "c_fox_inverted")


def make_caption_folder(folder: Path) -> None:
    """Three images, two of one size (batched together) and one of another, plus a non-image file."""
    folder.mkdir()
    for name, picture in zip(CAPTION_NAMES, caption_pictures()):
        picture.save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def executor(comfy_env: dict[str, Path], pipe: Any) -> Executor:
    return Executor(CoreNodes(comfy_env["input"], pipe))


@pytest.fixture(scope="module")
def pipe(comfy_env: dict[str, Path]) -> Any:
    """The core pipeline the Loader node hands out for the workflows' settings."""
    result = SPECS["InternVLU_Loader"].run(checkpoint="InternVL-U", dtype="auto", device="auto", memory="keep_loaded")
    model = result.values[0]
    pipe = model.pipeline()
    pipe._test_handle = model  # keep the shared handle (and so the loaded weights) alive
    return pipe


def pil_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def example() -> Image.Image:
    return Image.open(EXAMPLE_SOURCE).convert("RGB")


def _inputs(prompt: dict, node_id: str) -> dict[str, Any]:
    return prompt[node_id]["inputs"]


def _find(prompt: dict, class_type: str, last: bool = False) -> str:
    found = [i for i, n in prompt.items() if n["class_type"] == class_type]
    return found[-1] if last else found[0]


def _text_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams", "seed")
    return {k: inputs[k] for k in keys}


def _draw_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    from nodes.image_nodes import PRESET_SIZES

    width, height = PRESET_SIZES.get(inputs["resolution"], (inputs["width"], inputs["height"]))
    if inputs["resolution"] == "same as input":
        width = height = 0
    return {
        "width": width or None,
        "height": height or None,
        "steps": inputs["steps"],
        "all_cfg_scale": inputs["all_cfg_scale"] or None,
        "part_cfg_scale": inputs["part_cfg_scale"] or None,
        "seed": inputs["seed"],
        "num_images": inputs["batch_size"],
    }


def expected_outputs(name: str, prompt: dict, pipe: Any) -> dict[str, Any]:
    """What the core gives for the workflow's inputs: node id -> answer text or images tensor."""
    fox = example()
    if name in ("internvlu_image_qa", "internvlu_multi_image_compare"):
        node = _find(prompt, "InternVLU_Understand")
        images = [fox] if name == "internvlu_image_qa" else [fox, ImageOps.invert(fox)]
        inputs = _inputs(prompt, node)
        return {node: pipe.understand(images, inputs["question"], **_text_kwargs(inputs))}
    if name == "internvlu_text_to_image":
        node = _find(prompt, "InternVLU_Generate")
        inputs = _inputs(prompt, node)
        return {node: pil_tensor(pipe.generate(inputs["prompt"], **_draw_kwargs(inputs)))}
    if name == "internvlu_reasoning_text_to_image":
        reason_node, node = _find(prompt, "InternVLU_Reason"), _find(prompt, "InternVLU_Generate")
        r_inputs = _inputs(prompt, reason_node)
        reasoning = pipe.reason(r_inputs["prompt"], **_text_kwargs(r_inputs))
        images = pipe.generate(r_inputs["prompt"], reasoning=reasoning, **_draw_kwargs(_inputs(prompt, node)))
        return {reason_node: reasoning.text, node: pil_tensor(images)}
    if name == "internvlu_edit":
        node = _find(prompt, "InternVLU_Edit")
        inputs = _inputs(prompt, node)
        return {node: pil_tensor(pipe.edit([fox], inputs["instruction"], **_draw_kwargs(inputs)))}
    if name == "internvlu_reasoning_edit":
        reason_node, node = _find(prompt, "InternVLU_Reason"), _find(prompt, "InternVLU_Edit")
        r_inputs = _inputs(prompt, reason_node)
        reasoning = pipe.reason(r_inputs["prompt"], [fox], **_text_kwargs(r_inputs))
        images = pipe.edit([fox], r_inputs["prompt"], reasoning=reasoning, **_draw_kwargs(_inputs(prompt, node)))
        return {reason_node: reasoning.text, node: pil_tensor(images)}
    if name == "internvlu_describe_then_edit":
        ask, node = _find(prompt, "InternVLU_Understand"), _find(prompt, "InternVLU_Edit")
        q_inputs = _inputs(prompt, ask)
        answer = pipe.understand([fox], q_inputs["question"], **_text_kwargs(q_inputs))
        images = pipe.edit([fox], answer, **_draw_kwargs(_inputs(prompt, node)))
        return {ask: answer, node: pil_tensor(images)}
    if name == "internvlu_caption_folder":
        node = _find(prompt, "InternVLU_Understand")
        inputs = _inputs(prompt, node)
        return {node: [pipe.understand([p], inputs["question"], **_text_kwargs(inputs)) for p in caption_pictures()]}
    if name == "internvlu_latent_vae_decode":
        node = _find(prompt, "InternVLU_Generate")
        inputs = _inputs(prompt, node)
        return {node: pil_tensor(pipe.generate(inputs["prompt"], **_draw_kwargs(inputs)))}
    if name == "internvlu_remote_server":  # the server answers what the core gives here
        reason_node, draw, ask, change = (_find(prompt, f"InternVLU_{kind}")
                                          for kind in ("Reason", "Generate", "Understand", "Edit"))
        r_inputs, q_inputs = _inputs(prompt, reason_node), _inputs(prompt, ask)
        reasoning = pipe.reason(r_inputs["prompt"], **_text_kwargs(r_inputs))
        drawn = pipe.generate(r_inputs["prompt"], reasoning=reasoning, **_draw_kwargs(_inputs(prompt, draw)))
        inputs = _inputs(prompt, change)
        return {
            reason_node: reasoning.text,
            draw: pil_tensor(drawn),
            ask: pipe.understand(drawn, q_inputs["question"], **_text_kwargs(q_inputs)),
            change: pil_tensor(pipe.edit([fox], inputs["instruction"], **_draw_kwargs(inputs))),
        }
    if name == "internvlu_lora_generate":  # computed on a second copy of the model: the adapter's own
        with_lora, base = _find(prompt, "InternVLU_Generate"), _find(prompt, "InternVLU_Generate", last=True)
        other = get_pipeline("internvlu-tiny")
        expected = {base: pil_tensor(other.generate(_inputs(prompt, base)["prompt"], **_draw_kwargs(_inputs(prompt, base))))}
        other.load_lora(os.environ["INTERNVLU_LORAS_DIR"] + "/" + EXAMPLE_LORA)
        try:
            inputs = _inputs(prompt, with_lora)
            expected[with_lora] = pil_tensor(other.generate(inputs["prompt"], **_draw_kwargs(inputs)))
        finally:
            other.remove_lora()
        return expected
    raise AssertionError(f"no expectation for workflow {name}")


def caption_pictures() -> list[Image.Image]:
    fox = example()
    return [fox, Image.open(TINY / "inputs" / "img_lake_70x70.png").convert("RGB"), ImageOps.invert(fox)]


# --- execution ------------------------------------------------------------------------------


def test_every_workflow_has_an_expectation() -> None:
    assert WORKFLOW_NAMES == sorted(
        [
            "internvlu_caption_folder",
            "internvlu_describe_then_edit",
            "internvlu_edit",
            "internvlu_image_qa",
            "internvlu_latent_vae_decode",
            "internvlu_lora_generate",
            "internvlu_multi_image_compare",
            "internvlu_reasoning_edit",
            "internvlu_reasoning_text_to_image",
            "internvlu_remote_server",
            "internvlu_text_to_image",
        ]
    )


def point_at(prompt: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
    """The prompt with every Remote Loader's base_url set to the test server (started on first need), its
    key in the environment variable the loader names."""
    for node in prompt.values():
        if node["class_type"] == "InternVLU_RemoteLoader":
            served = request.getfixturevalue("served")
            node["inputs"]["base_url"] = served.url
            request.getfixturevalue("monkeypatch").setenv(node["inputs"]["api_key_env"], served.api_key)
    return prompt


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_api_workflow_runs_and_matches_the_core(
    name: str, executor: Executor, pipe: Any, request: pytest.FixtureRequest
) -> None:
    prompt = point_at(fast_prompt(load_api(name)), request)
    results = executor.run(prompt)
    expected = expected_outputs(name, prompt, pipe)
    for node_id, want in expected.items():
        outputs = results[node_id]["outputs"]
        if isinstance(want, (str, list)):
            want = [want] if isinstance(want, str) else want
            got = outputs[0] if results[node_id]["class_type"] != "InternVLU_Reason" else outputs[1]
            assert got == want
            assert results[node_id]["text"] == ["\n\n".join(want)]  # shown on the node
        else:
            (images,) = outputs[0]
            assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[-1] == 3
            assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
            assert torch.equal(images, want)
    if name == "internvlu_edit":  # resolution "same as input": the input image's size
        fox = example()
        assert tuple(results[_find(prompt, "InternVLU_Edit")]["outputs"][0][0].shape) == (1, fox.height, fox.width, 3)
    for node in prompt.values():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            source, slot = node["inputs"]["images"]
            assert all(image.ndim == 4 for image in results[str(source)]["outputs"][slot])


def test_caption_folder_writes_one_txt_per_image(executor: Executor, pipe: Any, comfy_env: dict[str, Path]) -> None:
    prompt = fast_prompt(load_api("internvlu_caption_folder"))
    results = executor.run(prompt)
    inputs = _inputs(prompt, _find(prompt, "InternVLU_Understand"))
    folder = comfy_env["output"] / "captions"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{name}{suffix}" for name in CAPTION_NAMES for suffix in (".png", ".txt")
    )
    for name, picture in zip(CAPTION_NAMES, caption_pictures()):
        caption = (folder / f"{name}.txt").read_text(encoding="utf-8")
        assert caption == pipe.understand([picture], inputs["question"], **_text_kwargs(inputs)).strip() + "\n"
        assert np.array_equal(np.asarray(Image.open(folder / f"{name}.png")), np.asarray(picture))
    assert results[_find(prompt, "InternVLU_SaveCaptions")]["outputs"][0] == [str(folder)]


def test_latent_output_decodes_to_the_generated_images(executor: Executor) -> None:
    prompt = fast_prompt(load_api("internvlu_latent_vae_decode"))
    results = executor.run(prompt)
    generate = _find(prompt, "InternVLU_Generate")
    (images,), (latent,) = results[generate]["outputs"]
    assert latent["samples"].dtype == torch.float32 and latent["samples"].shape == (1, 4, 1, 8, 8)
    (decoded,) = results[_find(prompt, "VAEDecode")]["outputs"][0]
    assert (decoded * 255 - images * 255).abs().max() <= 1.0


def test_generate_batch_size(executor: Executor, pipe: Any) -> None:
    prompt = fast_prompt(load_api("internvlu_text_to_image"))
    node = _find(prompt, "InternVLU_Generate")
    prompt[node]["inputs"].update(resolution="custom (width x height)", batch_size=2, width=48, height=32, steps=1)
    (images,), (latent,) = executor.run(prompt)[node]["outputs"]
    assert tuple(images.shape) == (2, 32, 48, 3)
    assert tuple(latent["samples"].shape) == (2, 4, 1, 4, 6)


# --- UI files -------------------------------------------------------------------------------


def _ui_node_info(node_type: str) -> tuple[list[tuple[str, str, bool]], list[str], list[str]]:
    """(inputs as (name, type, is_widget), outputs, frontend-only widgets) of a node type."""
    if node_type in SPECS:
        spec = SPECS[node_type]
        inputs = [(i.name, i.type, i.is_widget) for i in spec.inputs]
        return inputs, [o.type for o in spec.outputs], []
    core = CORE_NODES[node_type]
    from workflows.tools.core_nodes import WIDGET_TYPES

    inputs = [(n, t, t in WIDGET_TYPES) for n, t in core["inputs"]]
    return inputs, [t for _, t in core["outputs"]], list(core.get("ui_widgets", []))


def _widget_names(node_type: str) -> list[str | None]:
    """Names behind each ``widgets_values`` slot (None for control-after-generate companions)."""
    if node_type in SPECS:
        names: list[str | None] = []
        for inp in SPECS[node_type].widget_inputs():
            names.append(inp.name)
            if inp.control_after_generate:
                names.append(None)
        return names
    inputs, _, ui_widgets = _ui_node_info(node_type)
    return [n for n, _, w in inputs if w] + [None] * len(ui_widgets)


def _types_compatible(output_type: str, input_type: str) -> bool:
    return output_type == input_type or "*" in (output_type, input_type)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_matches_the_node_schemas(name: str, comfy_env: dict[str, Path]) -> None:
    ui = load_ui(UI_DIR / f"{name}.json")
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max((link[0] for link in ui["links"]), default=0)
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        inputs, outputs, _ = _ui_node_info(node["type"])
        declared = {n: t for n, t, _ in inputs}
        for inp in node["inputs"]:
            assert inp["name"] in declared, f"{node['type']} has no input {inp['name']}"
            assert inp["type"] == declared[inp["name"]]
        for index, out in enumerate(node["outputs"]):
            assert out["type"] == outputs[index]
        assert len(node["widgets_values"]) == len(_widget_names(node["type"]))
        if node["type"] in SPECS:
            for value, widget in zip(node["widgets_values"], _widget_names(node["type"])):
                if widget is None:
                    assert value in ("fixed", "increment", "decrement", "randomize")
                else:
                    validate_widget(SPECS[node["type"]], widget, value)
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        out = nodes[source]["outputs"][source_slot]
        inp = nodes[target]["inputs"][target_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == link_type
        assert _types_compatible(link_type, inp["type"])


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_is_the_twin_of_the_api_workflow(name: str) -> None:
    ui, api = load_ui(UI_DIR / f"{name}.json"), load_api(name)
    real_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in VIRTUAL_NODES}
    assert set(real_nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    for node_id, node in real_nodes.items():
        api_inputs = api[node_id]["inputs"]
        assert api[node_id]["class_type"] == node["type"]
        from_ui: dict[str, Any] = {}
        for inp in node["inputs"]:
            if inp["link"] is not None:
                _, source, slot, _, _, _ = links[inp["link"]]
                from_ui[inp["name"]] = [str(source), slot]
        for value, widget in zip(node["widgets_values"], _widget_names(node["type"])):
            if widget is not None and widget not in from_ui:
                from_ui[widget] = value
        assert from_ui == api_inputs, f"node {node_id} ({node['type']})"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_template_browser_copy_and_thumbnail(name: str) -> None:
    template = TEMPLATE_DIR / f"{name}.json"
    assert template.read_text(encoding="utf-8") == (UI_DIR / f"{name}.json").read_text(encoding="utf-8")
    thumbnail = TEMPLATE_DIR / f"{name}.jpg"  # the frontend asks for <name>.jpg
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.width <= 640
    assert thumbnail.stat().st_size < 50_000


def test_no_stray_json_in_template_folders() -> None:
    """ComfyUI lists every *.json directly in workflows/ or example_workflows/ as a template."""
    assert not list((ROOT / "workflows").glob("*.json"))
    assert sorted(p.stem for p in TEMPLATE_DIR.glob("*.json")) == WORKFLOW_NAMES


def test_workflow_files_are_up_to_date() -> None:
    from workflows.tools.build import rendered

    for path, content in rendered().items():
        assert path.read_text(encoding="utf-8") == content, f"{path} is stale: run the build"
