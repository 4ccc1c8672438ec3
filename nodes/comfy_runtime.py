"""Optional access to a running ComfyUI: progress, interruption, previews, model folders, devices.

Every function works without ComfyUI (plain Python, tests): then progress is silent, the
interrupt flag is a local one and model folders come from ``INTERNVLU_MODELS_DIR``.
"""

from __future__ import annotations

import importlib
import os
import threading
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

MODEL_FOLDER_KEY = "internvl_u"
MODELS_DIR_ENV = "INTERNVLU_MODELS_DIR"
INPUT_DIR_ENV = "INTERNVLU_INPUT_DIR"
OUTPUT_DIR_ENV = "INTERNVLU_OUTPUT_DIR"


class ProcessingInterrupted(Exception):
    """Raised outside ComfyUI when :func:`request_interrupt` was called (ComfyUI raises its own)."""


@cache
def comfy_module(name: str) -> ModuleType | None:
    """Import a ComfyUI module (``comfy.model_management``, ``folder_paths``...) or return None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# --- interruption ---------------------------------------------------------------------------

_local_interrupt = threading.Event()


def request_interrupt() -> None:
    """Ask the running job to stop at its next step or token (ComfyUI's Cancel does the same)."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        mm.interrupt_current_processing(True)
    else:
        _local_interrupt.set()


def check_interrupt() -> None:
    """Raise if the user cancelled; ComfyUI then reports "Processing interrupted"."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    elif _local_interrupt.is_set():
        _local_interrupt.clear()
        raise ProcessingInterrupted("interrupted")


# --- progress and previews ------------------------------------------------------------------


class Progress:
    """A progress bar on the executing node (``comfy.utils.ProgressBar``); silent outside ComfyUI."""

    def __init__(self, total: int) -> None:
        utils = comfy_module("comfy.utils")
        self._bar = utils.ProgressBar(total) if utils is not None else None
        self.total = total

    def update(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(value, total, preview)


def preview_settings() -> tuple[bool, int]:
    """Whether latent previews are on (``--preview-method`` other than none) and their max size."""
    cli = comfy_module("comfy.cli_args")
    if cli is None:
        return False, 512
    method = getattr(cli.args, "preview_method", None)
    enabled = method is not None and method != cli.LatentPreviewMethod.NoPreviews
    return enabled, int(getattr(cli.args, "preview_size", 512))


# --- model folders --------------------------------------------------------------------------


def register_model_folder() -> None:
    """Register ``models/internvl_u`` with ComfyUI's folder_paths (extra_model_paths.yaml adds more)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER_KEY)
    folder_paths.add_model_folder_path(MODEL_FOLDER_KEY, default, is_default=True)


def model_roots() -> list[Path]:
    """Folders that hold model folders, in priority order."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        register_model_folder()
        return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER_KEY)]
    configured = os.environ.get(MODELS_DIR_ENV)
    if configured:
        return [Path(p) for p in configured.split(os.pathsep) if p]
    return [Path("models") / MODEL_FOLDER_KEY]


def input_directory() -> Path:
    """ComfyUI's input folder (``--input-directory``); outside ComfyUI ``INTERNVLU_INPUT_DIR`` or ./input."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.get_input_directory())
    return Path(os.environ.get(INPUT_DIR_ENV, "input"))


def output_directory() -> Path:
    """ComfyUI's output folder (``--output-directory``); outside ComfyUI ``INTERNVLU_OUTPUT_DIR`` or ./output."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.get_output_directory())
    return Path(os.environ.get(OUTPUT_DIR_ENV, "output"))


# --- devices --------------------------------------------------------------------------------


def device_choices() -> list[str]:
    """Device options for the loader: auto (ComfyUI decides), cpu, then the accelerators present."""
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    return choices


def resolve_devices(choice: str) -> tuple[Any, Any]:
    """(load device, offload device) for a loader ``device`` choice."""
    import torch

    mm = comfy_module("comfy.model_management")
    offload = mm.unet_offload_device() if mm is not None else torch.device("cpu")
    if choice == "auto":
        if mm is not None:
            return mm.get_torch_device(), offload
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), offload
    device = torch.device(choice)
    return device, (device if device.type == "cpu" else offload)


def resolve_dtype(choice: str, device: Any) -> Any:
    """The torch dtype for a loader ``dtype`` choice: ComfyUI picks "auto" on an accelerator, else the core does."""
    mm = comfy_module("comfy.model_management")
    if choice == "auto" and mm is not None and device.type != "cpu":
        import torch

        if mm.should_use_bf16(device):
            return torch.bfloat16
        return torch.float16 if mm.should_use_fp16(device) else torch.float32
    from .core_import import core

    return core().validation.dtype(choice, device)
