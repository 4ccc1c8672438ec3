"""Locating a checkpoint and streaming its safetensors weights into modules built on the meta device.

Only safetensors are read: pickle checkpoints (``.bin``/``.pt``) can execute code when loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .download import COMPONENTS, component_folder, download_checkpoint, resolve_checkpoint  # noqa: F401 (re-exported)
from .errors import ModelLoadError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# Loggers of optional backends that shout while transformers/diffusers import them (e.g. torchao's
# CUDA-only extensions on a CPU machine, torch's pytree deprecation notes): harmless, never actionable.
_IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def import_model_libraries() -> None:
    """Import the transformers/diffusers model code once, with optional backends' import chatter muted.

    Installing torchao (for quantisation) makes both libraries import it eagerly, which logs warnings
    about kernels this machine cannot use on every model load. They are emitted only at first import,
    so importing here under raised log levels keeps a load's output to our own progress lines.
    """
    import logging

    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import diffusers.models.modeling_utils  # noqa: F401
        import diffusers.quantizers  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"missing file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a component: a sharded index, else every ``*.safetensors`` file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0])
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{indexes[0]} has no 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shards listed in {indexes[0]} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}). Pickle files can run "
            "arbitrary code when loaded, so they are refused. Convert them once in a trusted "
            "environment, e.g. `safetensors.torch.save_file(torch.load(path, weights_only=True), "
            "'model.safetensors')`, or download the safetensors release."
        )
    raise ModelLoadError(f"{folder} contains no .safetensors weight file")


def iter_safetensors(files: Iterable[Path]):
    """Yield ``(file, name, tensor)`` from memory-mapped safetensors files, one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read weights file {file}: it is truncated or corrupt ({exc})") from exc
        with handle:
            for name in handle.keys():
                try:
                    yield file, name, handle.get_tensor(name)
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {exc}") from exc


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, read on request through a mapping of its own.

    A file tensor is a view of the file's memory map, and every page read through it stays in the
    process's resident memory while the mapping lives (as long as any tensor of that file does).
    Reading a tensor that is converted at once (quantised) through a short-lived mapping instead lets
    its pages go as soon as the piece has been converted.
    """

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) as a tensor of their own; the mapping is closed after."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.file), framework="pt", device="cpu") as handle:
                return handle.get_slice(self.name)[start:stop].clone()
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read tensor {self.name!r} from {self.file}: {exc}") from exc


#: Makes the module that replaces an ``nn.Linear`` from its stored weight and its (loaded) bias.
LinearBuilder = Callable[[StoredTensor, "torch.Tensor | None"], torch.nn.Module]


def _format_names(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")


def load_weights_into(
    module: torch.nn.Module,
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    optional: Iterable[str] = (),
    dtype_overrides: Mapping[str, torch.dtype] | None = None,
    replace: Mapping[str, LinearBuilder] | None = None,
    tied: Mapping[str, str] | None = None,
) -> None:
    """Assign every tensor of ``folder``'s safetensors to ``module`` (built on the meta device).

    Tensors whose dtype is already ``dtype`` are the memory-mapped file itself (no copy, pages are
    read on first use); others are converted in one pass. Missing or unexpected names and shape
    mismatches are errors that name the parameters, raised before anything is assigned, so a
    checkpoint of another model is never half-loaded. ``optional`` names may be absent (tied heads).
    ``dtype_overrides`` maps a name prefix to the dtype of the floating tensors under it (a quantised
    LLM is read in its own dtype while the rest of the VLM keeps ``dtype``).

    ``replace`` maps names of ``nn.Linear`` submodules to a builder of their replacement (CPU int8
    quantises each layer as it is loaded): the builder gets the stored weight as a
    :class:`StoredTensor`, which it reads in pieces, so the full-precision model is never resident.
    ``tied`` names the stored tensor a replaced weight absent from the files is read from (a head
    tied to the embedding).
    """
    files = safetensors_files(folder)
    expected = dict(module.named_parameters())
    expected.update((n, b) for n, b in module.named_buffers() if n in module.state_dict())
    replace = dict(replace or {})
    replaced_weights = {f"{name}.weight": name for name in replace}
    located: dict[str, StoredTensor] = {}  # every expected tensor found in the files
    stored: dict[str, StoredTensor] = {}  # the replaced weights, read later by their builders
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file, name, tensor in iter_safetensors(files):
        target = expected.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelLoadError(
                f"parameter {name!r} in {file} has shape {tuple(tensor.shape)}, but the config in "
                f"{folder}/config.json implies {tuple(target.shape)}"
            )
        located[name] = StoredTensor(file, name, tuple(tensor.shape), tensor.dtype)
        if name in replaced_weights:
            # Only its header was looked at: the long-lived mapping's pages of this tensor stay unread.
            stored[name] = located[name]
            continue
        wanted = next((d for prefix, d in (dtype_overrides or {}).items() if name.startswith(prefix)), dtype)
        state[name] = _placed(tensor, wanted if tensor.is_floating_point() else tensor.dtype, device)
    for weight, source in (tied or {}).items():
        if weight in replaced_weights and weight not in stored and source in located:
            stored[weight] = located[source]
    missing = set(expected) - set(state) - set(stored) - set(optional)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing parameters: {_format_names(missing)}")
        if unexpected:
            parts.append(f"unexpected parameters: {_format_names(unexpected)}")
        raise ModelLoadError(
            f"weights in {folder} do not match its config.json ({'; '.join(parts)})"
        )
    module.load_state_dict(state, strict=False, assign=True)
    for weight, linear_name in replaced_weights.items():
        if weight not in stored:
            continue  # an optional weight that is absent (a tied head nobody replaces)
        linear = module.get_submodule(linear_name)
        bias = None if linear.bias is None else state[f"{linear_name}.bias"]
        parent_name, _, child = linear_name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, replace[linear_name](stored[weight], bias))


def _placed(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A mapped file tensor as the module will hold it: itself when nothing changes, else one copy.

    On an accelerator the file's bytes are moved first and converted there, where it is cheap.
    """
    if device.type == "cpu":
        return tensor.to(dtype)
    return tensor.to(device).to(dtype)
