"""The LoRA node: a MODEL with an adapter on top, leaving the input MODEL as it was.

Like ComfyUI's own LoRA loader (which clones the ModelPatcher and adds patches to the clone), the
node returns a new handle that shares the loaded weights and records ``(adapter file, strength)``;
the adapters are switched on inside the core pipeline only for the jobs of that handle. Another
branch of the graph that uses the input MODEL runs with them switched off: the exact base model.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from .comfy_runtime import comfy_module
from .common_inputs import model_input
from .model_handle import InternVLUModel
from .schema import MODEL_TYPE, NODE_ID_PREFIX, InputSpec, NodeResult, NodeSpec, OutputSpec

#: ComfyUI's shared LoRA folder and ours (``models/internvl_u_loras``; extra_model_paths.yaml can add more).
LORA_FOLDER_KEYS = ("internvl_u_loras", "loras")
LORAS_DIR_ENV = "INTERNVLU_LORAS_DIR"  # outside ComfyUI: folders to list, separated by os.pathsep
_SUFFIX = ".safetensors"


def register_lora_folder() -> None:
    """Add ``models/internvl_u_loras`` to ComfyUI's folder_paths (``loras`` is ComfyUI's own)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, LORA_FOLDER_KEYS[0])
    folder_paths.add_model_folder_path(LORA_FOLDER_KEYS[0], default, is_default=True)
    if LORA_FOLDER_KEYS[0] not in getattr(folder_paths, "folder_names_and_paths", {}):
        return
    extensions = folder_paths.folder_names_and_paths[LORA_FOLDER_KEYS[0]][1]
    if isinstance(extensions, set):
        extensions.add(_SUFFIX)


def _roots() -> list[Path]:
    configured = os.environ.get(LORAS_DIR_ENV)
    if configured:
        return [Path(p) for p in configured.split(os.pathsep) if p]
    return [Path("models") / key for key in LORA_FOLDER_KEYS]


def lora_choices() -> list[str]:
    """``.safetensors`` files in the LoRA folders (relative names, ours first, no duplicates)."""
    folder_paths = comfy_module("folder_paths")
    names: list[str] = []
    if folder_paths is not None:
        register_lora_folder()
        for key in LORA_FOLDER_KEYS:
            names += [n for n in folder_paths.get_filename_list(key) if n.endswith(_SUFFIX) and n not in names]
        return names
    for root in _roots():
        if root.is_dir():
            names += [p.relative_to(root).as_posix() for p in sorted(root.rglob(f"*{_SUFFIX}"))
                      if p.relative_to(root).as_posix() not in names]
    return names


def resolve_lora(name: str) -> Path:
    """The file behind a ``lora_name`` choice; names outside the LoRA folders are refused."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        register_lora_folder()
        for key in LORA_FOLDER_KEYS:
            if name in folder_paths.get_filename_list(key):
                full = folder_paths.get_full_path(key, name)
                if full:
                    return Path(full)
    else:
        for root in _roots():
            candidate = (root / name).resolve()
            if candidate.is_file() and candidate.is_relative_to(root.resolve()) and candidate.suffix == _SUFFIX:
                return candidate
    raise FileNotFoundError(
        f"No LoRA named {name!r} in models/internvl_u_loras or models/loras; put the .safetensors file there"
    )


class LoraModel:
    """An ``INTERNVLU_MODEL`` handle: a loaded model plus the adapters its jobs run with."""

    def __init__(self, base: InternVLUModel, loras: tuple[tuple[str, float], ...]) -> None:
        self.base = base
        self.loras = loras

    def __repr__(self) -> str:
        return f"LoraModel({self.base!r}, {self.loras!r})"

    def use(self) -> AbstractContextManager[Any]:
        return self.base.use(self.loras)

    def offload(self) -> None:
        self.base.offload()

    def release(self) -> None:
        self.base.release()

    def to_comfy_latent(self, pipe: Any, latents: Any) -> dict[str, Any]:
        return self.base.to_comfy_latent(pipe, latents)

    def images_from_comfy_latent(self, pipe: Any, latent: dict[str, Any]) -> list[Any]:
        return self.base.images_from_comfy_latent(pipe, latent)


def apply_lora(model: Any, lora_name: str, strength: float) -> NodeResult:
    """A new handle with the adapter added (chained nodes add theirs); the input handle is not changed."""
    if isinstance(model, LoraModel):
        base, loras = model.base, model.loras
    elif isinstance(model, InternVLUModel):
        base, loras = model, ()
    else:
        raise TypeError(
            "The InternVL-U LoRA node works on a model loaded here (InternVL-U Loader); a served model takes its "
            "adapters on its server (internvl-u serve --lora)"
        )
    path = resolve_lora(lora_name)
    with base.use(loras + ((str(path), float(strength)),)):  # load and check now: a bad file fails on this node
        pass
    info = base.pipeline().loras.loaded
    trigger = next((entry.info.trigger_words for entry in info.values()
                    if entry.source == str(path) and entry.info is not None), ())
    text = f"{Path(lora_name).name} at {strength:g}" + (f"; trigger words: {', '.join(trigger)}" if trigger else "")
    return NodeResult((LoraModel(base, loras + ((str(path), float(strength)),)),), text=text)


LORA = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}LoRA",
    display_name="InternVL-U LoRA",
    description="Add a LoRA adapter to an InternVL-U model. Chain several for several adapters; the input model is "
                "left unchanged for other branches of the graph.",
    inputs=(
        model_input(),
        InputSpec(
            "lora_name",
            "COMBO",
            "An InternVL-U adapter (.safetensors) from models/internvl_u_loras or models/loras, e.g. one written "
            "by 'internvl-u train-lora'. Adapters made for other models are refused with the mismatch named.",
            options=lora_choices,
        ),
        InputSpec(
            "strength",
            "FLOAT",
            "How strongly the adapter acts: 1 as trained, 0 the base model, negative values push away from it.",
            default=1.0,
            min=-10.0,
            max=10.0,
            step=0.05,
        ),
    ),
    outputs=(OutputSpec("lora_model", MODEL_TYPE, "The model with the adapter; the input model stays without it."),),
    run=apply_lora,
)
