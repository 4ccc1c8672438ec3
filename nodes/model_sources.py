"""Finding InternVL-U checkpoints under ``models/internvl_u/`` and, on request, downloading one."""

from __future__ import annotations

import logging
from pathlib import Path

from .comfy_runtime import model_roots
from .core_import import core

log = logging.getLogger(__name__)

#: Hub checkpoints offered in the loader; downloaded only when the user enables ``allow_download``.
HUB_MODELS = (core().DEFAULT_HUB_ID,)

_MARKER = "model_index.json"
_MAX_DEPTH = 2


def _checkpoint_dirs(root: Path) -> list[str]:
    """Folders under ``root`` (up to two levels deep) that hold a checkpoint, as relative names."""
    found: list[str] = []
    if not root.is_dir():
        return found
    frontier = [root]
    for _ in range(_MAX_DEPTH):
        next_frontier = []
        for folder in frontier:
            for child in sorted(folder.iterdir()):
                if not child.is_dir() or child.name.startswith("."):
                    continue
                if (child / _MARKER).is_file():
                    found.append(child.relative_to(root).as_posix())
                else:
                    next_frontier.append(child)
        frontier = next_frontier
    return found


def local_models() -> list[str]:
    """Names of the local checkpoints, first root first, without duplicates."""
    names: list[str] = []
    for root in model_roots():
        for name in _checkpoint_dirs(root):
            if name not in names:
                names.append(name)
    return names


def model_choices() -> list[str]:
    """The loader's ``model`` options: local folders, then the hub ids not yet downloaded."""
    local = local_models()
    return local + [hub for hub in HUB_MODELS if _download_dir_name(hub) not in local]


def _download_dir_name(hub_id: str) -> str:
    return hub_id.rsplit("/", 1)[-1]


def _find_local(name: str) -> Path | None:
    for root in model_roots():
        candidate = root / name
        if (candidate / _MARKER).is_file():
            return candidate
    return None


def resolve_model(name: str, allow_download: bool) -> Path:
    """The checkpoint folder for a loader choice; downloads a hub id only if ``allow_download``."""
    local = _find_local(name)
    if local is not None:
        return local
    if name in HUB_MODELS:
        downloaded = _find_local(_download_dir_name(name))
        if downloaded is not None:
            return downloaded
        if not allow_download:
            roots = ", ".join(str(r) for r in model_roots())
            raise FileNotFoundError(
                f"InternVL-U checkpoint {name!r} is not downloaded. Enable 'allow_download' on the "
                f"loader, or place the checkpoint folder in one of: {roots}"
            )
        return _download(name)
    roots = ", ".join(str(r) for r in model_roots())
    raise FileNotFoundError(f"No InternVL-U checkpoint named {name!r} in: {roots}")


def _download(hub_id: str) -> Path:
    """Download a hub checkpoint into the first model folder (``models/internvl_u/<name>``)."""
    target = model_roots()[0] / _download_dir_name(hub_id)
    log.info("InternVL-U: downloading %s to %s", hub_id, target)
    return core().download_checkpoint(hub_id, local_dir=target)
