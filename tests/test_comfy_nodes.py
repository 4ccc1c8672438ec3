"""Node declarations (ids, tooltips, V3 rules) and runtime behaviour: interrupt, unload, loader."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from internvl_u_core import (  # noqa: E402
    DEFAULT_LIMITS,
    CheckpointNotDownloaded,
    InvalidInputError,
    RemoteError,
    offload,
    quantization,
)
from nodes import all_specs  # noqa: E402
from nodes.comfy_runtime import ProcessingInterrupted, request_interrupt  # noqa: E402
from nodes.images import pils_to_tensor, tensor_to_pils  # noqa: E402
from nodes.model_handle import core_offload_mode  # noqa: E402
from nodes.schema import CATEGORY, object_info  # noqa: E402

COMFY_MAX_SEED = 0xFFFFFFFFFFFFFFFF  # the largest value ComfyUI's seed widgets hold

TINY = ROOT / "tests" / "fixtures" / "internvlu-tiny"
SPECS = {spec.node_id: spec for spec in all_specs()}
FOX = TINY / "inputs" / "img_fox_80x60.png"

# --- declarations ---------------------------------------------------------------------------


def test_node_set() -> None:
    assert sorted(SPECS) == [
        "InternVLU_Edit",
        "InternVLU_Generate",
        "InternVLU_LoadImageFolder",
        "InternVLU_Loader",
        "InternVLU_Reason",
        "InternVLU_RemoteLoader",
        "InternVLU_SaveCaptions",
        "InternVLU_Understand",
        "InternVLU_Unload",
    ]


@pytest.mark.parametrize("node_id", sorted(SPECS))
def test_identity_and_tooltips(node_id: str) -> None:
    spec = SPECS[node_id]
    assert spec.category == CATEGORY == "InternVL-U"
    assert spec.display_name.startswith("InternVL-U ")
    assert spec.description
    for item in (*spec.inputs, *spec.outputs):
        assert item.tooltip and len(item.tooltip) > 10, f"{node_id}.{item.name} needs a tooltip"


@pytest.mark.parametrize("node_id", sorted(SPECS))
def test_v3_schema_rules(node_id: str) -> None:
    spec = SPECS[node_id]
    names = [i.name for i in spec.inputs] + [o.name for o in spec.outputs]
    assert len(names) == len(set(names)), "V3 needs ids unique across inputs and outputs"
    for inp in spec.inputs:
        if inp.type == "INT":
            assert inp.max is not None, "without max the frontend caps INT widgets at 2048"
        if inp.name == "seed":
            assert (inp.min, inp.max) == (0, DEFAULT_LIMITS.max_seed) and inp.control_after_generate
            assert inp.max <= COMFY_MAX_SEED
        if inp.type == "COMBO" and not callable(inp.options):
            assert inp.default in inp.option_list()


def test_object_info_shape() -> None:
    info = object_info(SPECS["InternVLU_Generate"])
    assert info["output"] == ["IMAGE", "LATENT"]
    assert info["output_is_list"] == [False, False]
    assert object_info(SPECS["InternVLU_Understand"])["output_is_list"] == [True]
    assert info["input_order"]["required"][:2] == ["model", "prompt"]
    assert info["input"]["optional"]["reasoning"][0] == "INTERNVLU_REASONING"
    assert info["input"]["required"]["seed"][1]["control_after_generate"] == "randomize"


def test_image_conversion_round_trips_exactly() -> None:
    picture = Image.open(FOX).convert("RGB")
    tensor = pils_to_tensor([picture, picture])
    assert tensor.shape == (2, 60, 80, 3) and tensor.dtype == torch.float32
    back = tensor_to_pils(tensor)
    assert np.array_equal(np.asarray(back[1]), np.asarray(picture))


# --- runtime --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models") / "internvl_u"
    models.mkdir()
    (models / "InternVL-U").symlink_to(TINY / "checkpoint", target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("INTERNVLU_MODELS_DIR", str(models))
    yield models
    patch.undo()


@pytest.fixture(scope="module")
def model(models_dir: Path) -> Any:
    return (
        SPECS["InternVLU_Loader"]
        .run(checkpoint="InternVL-U", dtype="fp32", device="cpu", memory="keep_loaded")
        .values[0]
    )


def _generate(model: Any, **overrides: Any) -> torch.Tensor:
    kwargs = dict(
        model=model,
        prompt="a lighthouse at dusk",
        resolution="custom (width x height)",
        width=32,
        height=32,
        steps=2,
        all_cfg_scale=0.0,
        part_cfg_scale=0.0,
        seed=11,
        batch_size=1,
    )
    return SPECS["InternVLU_Generate"].run(**(kwargs | overrides)).values[0]


def _understand(model: Any, image: torch.Tensor | None = None, **overrides: Any) -> list[str]:
    """Understand's answers; its inputs are lists (is_input_list), as ComfyUI passes them."""
    kwargs = dict(
        model=model,
        image=pils_to_tensor([Image.open(FOX).convert("RGB")]) if image is None else image,
        question="What?",
        max_new_tokens=6,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        num_beams=1,
        seed=0,
        per_image=False,
    ) | overrides
    return SPECS["InternVLU_Understand"].run(**{k: [v] for k, v in kwargs.items()}).values[0]


def test_loader_lists_local_folders_and_hub_ids(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = SPECS["InternVLU_Loader"].input("checkpoint").option_list
    # models/internvl_u/InternVL-U is where the hub id would be downloaded to: listed once
    assert options() == ["InternVL-U"]
    (tmp_path / "group" / "mine").mkdir(parents=True)
    (tmp_path / "group" / "mine" / "model_index.json").write_text("{}")
    monkeypatch.setenv("INTERNVLU_MODELS_DIR", str(tmp_path))
    assert options() == ["group/mine", "InternVL-U/InternVL-U"]


def test_loader_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNVLU_MODELS_DIR", str(tmp_path))
    loader = SPECS["InternVLU_Loader"]
    with pytest.raises(FileNotFoundError, match="allow_download"):
        loader.run(checkpoint="InternVL-U/InternVL-U", dtype="auto", device="cpu", memory="keep_loaded")
    with pytest.raises(FileNotFoundError, match="No InternVL-U checkpoint named 'nope'"):
        loader.run(checkpoint="nope", dtype="auto", device="cpu", memory="keep_loaded")
    # Downloads go through the core's one hub download (allow-list, offline mode, clear errors).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotDownloaded, match="InternVL-U/InternVL-U"):
        loader.run(checkpoint="InternVL-U/InternVL-U", dtype="auto", device="cpu", memory="keep_loaded",
                   allow_download=True)


def test_equal_settings_share_one_model(model: Any) -> None:
    again = (
        SPECS["InternVLU_Loader"]
        .run(checkpoint="InternVL-U", dtype="fp32", device="cpu", memory="keep_loaded")
        .values[0]
    )
    assert again is model


def test_interrupt_stops_generation_and_the_next_run_works(model: Any) -> None:
    reference = _generate(model)
    request_interrupt()
    with pytest.raises(ProcessingInterrupted):
        _generate(model, steps=50)
    assert torch.equal(_generate(model), reference)


def test_interrupt_stops_text_generation(model: Any) -> None:
    reference = _understand(model)
    request_interrupt()
    with pytest.raises(ProcessingInterrupted):
        _understand(model)
    assert _understand(model) == reference


def test_unload_offload_and_free_ram(model: Any) -> None:
    reference = _generate(model)
    unload = SPECS["InternVLU_Unload"]
    result = unload.run(model=model, mode="offload", passthrough=reference)
    assert result.values[0] is reference and model.is_loaded
    unload.run(model=model, mode="free_ram")
    assert not model.is_loaded
    assert torch.equal(_generate(model), reference)  # reloaded from disk on demand
    assert model.is_loaded


def test_loader_modes_come_from_the_core(models_dir: Path) -> None:
    loader = SPECS["InternVLU_Loader"]
    assert loader.input("quantization").option_list() == ["none", *quantization.MODES]
    memory = loader.input("memory").option_list()
    assert memory[:2] == ["keep_loaded", "offload_after_run"]
    assert [core_offload_mode(choice) for choice in memory] == [None, None, *offload.MODES]
    assert "cpu_offload" in memory  # the name saved workflows use for the core's "model" offload


def test_int8_loader_runs_on_the_cpu(models_dir: Path) -> None:
    handle = (
        SPECS["InternVLU_Loader"]
        .run(checkpoint="InternVL-U", dtype="fp32", device="cpu", memory="keep_loaded", quantization="int8")
        .values[0]
    )
    assert handle.pipeline().quantization.mode == "int8"
    assert _generate(handle).shape == (1, 32, 32, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("memory", ["cpu_offload", "group_offload", "sequential_offload"])
def test_offload_memory_modes_on_the_cpu_are_refused_clearly(models_dir: Path, memory: str) -> None:
    with pytest.raises(InvalidInputError, match="nothing to offload to"):
        SPECS["InternVLU_Loader"].run(checkpoint="InternVL-U", dtype="fp32", device="cpu", memory=memory)


def test_offload_after_run_mode(models_dir: Path) -> None:
    handle = (
        SPECS["InternVLU_Loader"]
        .run(checkpoint="InternVL-U", dtype="fp32", device="cpu", memory="offload_after_run")
        .values[0]
    )
    images = _generate(handle)
    assert images.shape == (1, 32, 32, 3) and handle.is_loaded


# --- per-image answers, latents, resolutions, dataset files ---------------------------------


def _three_images() -> list[Image.Image]:
    fox = Image.open(FOX).convert("RGB")
    return [fox, fox.rotate(180), Image.fromarray(255 - np.asarray(fox))]


def test_per_image_mode_gives_each_image_its_own_answer(model: Any) -> None:
    pictures = _three_images()
    answers = _understand(model, pils_to_tensor(pictures), per_image=True, max_new_tokens=12)
    alone = [model.pipeline().understand([p], "What?", max_new_tokens=12) for p in pictures]
    assert answers == alone and len(set(alone)) == 3
    together = _understand(model, pils_to_tensor(pictures), max_new_tokens=12)
    assert len(together) == 1 and together[0] == model.pipeline().understand(pictures, "What?", max_new_tokens=12)


def test_per_image_mode_over_a_list_of_images_of_different_sizes(model: Any) -> None:
    """A folder's list (is_input_list): one answer per image, in order, sizes batched separately."""
    pictures = _three_images() + [Image.open(TINY / "inputs" / "img_lake_70x70.png").convert("RGB")]
    lists = dict(model=[model], image=[pils_to_tensor([p]) for p in pictures], question=["What?"],
                 max_new_tokens=[8], do_sample=[False], temperature=[1.0], top_p=[1.0], num_beams=[1],
                 seed=[0], per_image=[True])
    result = SPECS["InternVLU_Understand"].run(**lists)
    assert result.values[0] == [model.pipeline().understand([p], "What?", max_new_tokens=8) for p in pictures]
    assert result.text == "\n\n".join(result.values[0])


def test_generate_latent_is_the_vae_space_of_the_final_latents(model: Any) -> None:
    images, latent = SPECS["InternVLU_Generate"].run(
        model=model, prompt="a lighthouse at dusk", resolution="custom (width x height)", width=48, height=32,
        steps=2, all_cfg_scale=0.0, part_cfg_scale=0.0, seed=11, batch_size=1,
    ).values
    pipe = model.pipeline()
    samples = latent["samples"]
    assert samples.shape == (1, 4, 1, 4, 6) and samples.dtype == torch.float32
    codec = pipe.codec
    normalised = pipe.from_vae_latents(samples)
    torch.testing.assert_close(samples[:, :, 0], normalised * codec.std + codec.mean, rtol=1e-6, atol=1e-6)
    # Two compute paths: the node decoded the sampler's latents; here they went to the VAE space and
    # back (float32, a few ulps off), so a pixel may round to the neighbouring grey level (seen on an
    # AVX-512 Xeon: 1 of 4,608 values). One level is the stated tolerance; anything more is a bug.
    torch.testing.assert_close(pils_to_tensor(pipe.decode_latents(normalised)), images, rtol=0, atol=1 / 255 + 1e-6)


def test_edit_accepts_a_latent_instead_of_an_image(model: Any) -> None:
    controls = dict(steps=2, all_cfg_scale=0.0, part_cfg_scale=0.0, seed=3, batch_size=1)
    images, latent = SPECS["InternVLU_Generate"].run(
        model=model, prompt="a tree", resolution="custom (width x height)", width=32, height=32, **controls
    ).values
    edit = dict(model=model, instruction="make it red", resolution="same as input", width=0, height=0, **controls)
    from_latent = SPECS["InternVLU_Edit"].run(**edit, image_latent=latent).values[0]
    from_image = SPECS["InternVLU_Edit"].run(**edit, image=images).values[0]
    assert from_latent.shape == (1, 32, 32, 3) and torch.equal(from_latent, from_image)
    with pytest.raises(ValueError, match="connect 'image' or 'image_latent'"):
        SPECS["InternVLU_Edit"].run(**edit)


def test_resolution_presets_are_about_one_megapixel_on_the_grid() -> None:
    from nodes.image_nodes import PRESET_SIZES

    for name, (width, height) in PRESET_SIZES.items():
        assert width % 32 == 0 and height % 32 == 0
        assert 0.8e6 <= width * height <= 1.1e6, name
        ratio = tuple(int(x) for x in name.split(" ")[0].split(":"))
        assert abs(width / height - ratio[0] / ratio[1]) < 0.05, name
        assert f"({width}x{height})" in name
    generate, edit = SPECS["InternVLU_Generate"], SPECS["InternVLU_Edit"]
    assert generate.input("resolution").option_list()[1:] == list(PRESET_SIZES)
    assert edit.input("resolution").default == "same as input"


def test_wan21_previews_use_the_latent_to_rgb_factors() -> None:
    from internvl_u_core.sampling import WAN21_RGB_BIAS, WAN21_RGB_FACTORS, latents_preview

    latents = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(0))
    preview = np.asarray(latents_preview(latents), dtype=np.float32)
    rgb = torch.einsum("chw,ck->hwk", latents[0], torch.tensor(WAN21_RGB_FACTORS)) + torch.tensor(WAN21_RGB_BIAS)
    expected = (((rgb + 1) / 2).clamp(0, 1) * 255).round().numpy()
    assert preview.shape == (5, 7, 3) and np.abs(preview - expected).max() <= 1
    plain = np.asarray(latents_preview(latents[:, :4]))  # other channel counts: three channels, min-max
    assert plain.min() == 0 and plain.max() == 255
    with pytest.raises(ValueError, match="rgb_factors"):
        latents_preview(latents, torch.zeros(4, 3))


def test_folder_nodes_stay_inside_comfyui_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNVLU_INPUT_DIR", str(tmp_path / "input"))
    monkeypatch.setenv("INTERNVLU_OUTPUT_DIR", str(tmp_path / "output"))
    (tmp_path / "input" / "set").mkdir(parents=True)
    load, save = SPECS["InternVLU_LoadImageFolder"], SPECS["InternVLU_SaveCaptions"]
    for folder in ("../elsewhere", str(tmp_path)):
        with pytest.raises(ValueError, match="folder"):
            load.run(folder=folder, limit=0)
    with pytest.raises(FileNotFoundError, match="no images"):
        load.run(folder="set", limit=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        load.run(folder="missing", limit=0)
    for index, picture in enumerate(_three_images()):
        picture.save(tmp_path / "input" / "set" / f"{index}.png")
    images, names = load.run(folder="set", limit=2).values
    assert names == ["0", "1"] and [tuple(i.shape) for i in images] == [(1, 60, 80, 3)] * 2
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        save.run(images=images, captions=["one"], folder=["out"])
    with pytest.raises(ValueError, match="leaves"):
        save.run(images=images, captions=["a", "b"], folder=["../../x"])
    with pytest.raises(ValueError, match="plain file name"):
        save.run(images=images, captions=["a", "b"], folder=["out"], names=["ok", "../bad"])
    save.run(images=images, captions=["a", "b"], folder=["out"])  # no names: numbered
    assert sorted(p.name for p in (tmp_path / "output" / "out").iterdir()) == [
        "image_00001.png", "image_00001.txt", "image_00002.png", "image_00002.txt"
    ]


def test_interrupt_stops_per_image_captioning(model: Any) -> None:
    pictures = pils_to_tensor(_three_images())
    request_interrupt()
    with pytest.raises(ProcessingInterrupted):
        _understand(model, pictures, per_image=True)
    assert len(_understand(model, pictures, per_image=True)) == 3


# --- a served model (InternVL-U Remote Loader) ----------------------------------------------

KEY_ENV = "INTERNVLU_NODE_TEST_KEY"


@pytest.fixture(scope="module")
def remote(served: Any) -> Any:
    """The Remote Loader's output on a real server, the key read from the environment variable it names."""
    patch = pytest.MonkeyPatch()
    patch.setenv(KEY_ENV, served.api_key)
    handle = SPECS["InternVLU_RemoteLoader"].run(base_url=served.url, api_key_env=KEY_ENV, timeout=300).values[0]
    yield handle
    handle.release()
    patch.undo()


def test_remote_loader_keeps_the_key_out_of_its_settings(remote: Any, served: Any) -> None:
    assert served.api_key not in repr(remote) and served.api_key not in repr(remote.settings)
    assert remote.settings.api_key_env == KEY_ENV


def test_served_model_gives_the_local_outputs(model: Any, remote: Any) -> None:
    """Every job node, with the Remote Loader's model instead of the Loader's: the same outputs."""
    fox = pils_to_tensor([Image.open(FOX).convert("RGB")])
    for handle_changes in ({}, {"all_cfg_scale": 3.0, "part_cfg_scale": 1.5, "batch_size": 2, "width": 48}):
        assert torch.equal(_generate(remote, **handle_changes), _generate(model, **handle_changes))
    reason = dict(prompt="paint it in autumn colours", max_new_tokens=8, do_sample=False, temperature=1.0,
                  top_p=1.0, num_beams=1, seed=0, image=fox)
    (served_reasoning, served_text), (local_reasoning, local_text) = (
        SPECS["InternVLU_Reason"].run(model=handle, **reason).values for handle in (remote, model)
    )
    assert served_reasoning == local_reasoning and served_text == local_text
    edit = dict(instruction="", resolution="same as input", width=0, height=0, steps=2, all_cfg_scale=0.0,
                part_cfg_scale=0.0, seed=4, batch_size=1, image=fox, reasoning=served_reasoning)
    served_edit, local_edit = (SPECS["InternVLU_Edit"].run(model=handle, **edit).values[0] for handle in (remote, model))
    assert served_edit.shape == (1, 60, 80, 3) and torch.equal(served_edit, local_edit)
    pictures = pils_to_tensor(_three_images())
    for per_image in (False, True):
        assert _understand(remote, pictures, per_image=per_image) == _understand(model, pictures, per_image=per_image)


def test_served_latents_are_explained_not_crashed(model: Any, remote: Any) -> None:
    controls = dict(steps=1, all_cfg_scale=0.0, part_cfg_scale=0.0, seed=3, batch_size=1)
    draw = dict(prompt="a tree", resolution="custom (width x height)", width=32, height=32, **controls)
    images, latent = SPECS["InternVLU_Generate"].run(model=remote, **draw).values
    assert images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="sends images, not latents.*'images' output"):
        latent["samples"]  # what ComfyUI's VAE Decode, KSampler or latent upscale read first
    local_latent = SPECS["InternVLU_Generate"].run(model=model, **draw).values[1]
    edit = dict(instruction="make it red", resolution="same as input", width=0, height=0, **controls)
    with pytest.raises(ValueError, match="'image_latent' needs a model loaded here.*VAE Decode"):
        SPECS["InternVLU_Edit"].run(model=remote, image_latent=local_latent, **edit)


def test_interrupt_cancels_the_server_job_and_the_next_run_works(remote: Any, served: Any) -> None:
    reference = _generate(remote)
    before = served.health()["cancelled"]
    request_interrupt()
    with pytest.raises(ProcessingInterrupted):
        _generate(remote, steps=1000)
    served.wait_for(lambda health: health["cancelled"] == before + 1 and health["running"] == 0)
    request_interrupt()
    with pytest.raises(ProcessingInterrupted):  # at the first token (the answer may end before the server notices)
        _understand(remote, max_new_tokens=2000)
    served.wait_for(lambda health: health["running"] == 0)
    assert torch.equal(_generate(remote), reference)


def test_unload_closes_the_connection_and_the_next_run_reconnects(remote: Any) -> None:
    reference = _understand(remote)
    SPECS["InternVLU_Unload"].run(model=remote, mode="offload")
    assert remote.is_loaded  # nothing to move: the server keeps its model
    SPECS["InternVLU_Unload"].run(model=remote, mode="free_ram")
    assert not remote.is_loaded
    assert _understand(remote) == reference and remote.is_loaded


def test_remote_loader_errors_are_clear(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodes.core_import import MissingDependencyError

    loader = SPECS["InternVLU_RemoteLoader"]
    monkeypatch.delenv(KEY_ENV, raising=False)
    keyless = loader.run(base_url=served.url, api_key_env=KEY_ENV, timeout=60).values[0]
    with pytest.raises(RemoteError, match=f"'api_key_env' \\({KEY_ENV}\\)") as refused:
        _understand(keyless)
    assert refused.value.status_code == 401
    given = loader.run(base_url=served.url, api_key_env="", timeout=60, api_key=served.api_key).values[0]
    assert _understand(given, max_new_tokens=2)  # a key from another node's output works as well
    with pytest.raises(InvalidInputError, match="base_url must be an http"):
        loader.run(base_url="127.0.0.1:8091", api_key_env="", timeout=60)
    monkeypatch.setitem(sys.modules, "httpx", None)  # as if httpx were not installed in ComfyUI's Python
    with pytest.raises(MissingDependencyError, match="httpx.*pip install httpx"):
        loader.run(base_url=served.url, api_key_env="", timeout=60)
