"""The object that flows through ``INTERNVLU_MODEL`` sockets.

It holds the loader's settings and a lazily (re)loaded pipeline, so the model can be unloaded
(even from RAM) while ComfyUI keeps the loader's output cached; the next job reloads it.
:class:`ModelHandle` is what nodes may use of it; ``remote_model.RemoteModel`` offers the same
for a served model.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from . import memory
from .comfy_runtime import resolve_devices, resolve_dtype
from .core_import import core

log = logging.getLogger(__name__)

DTYPES = ("auto", "bf16", "fp16", "fp32")
KEEP_LOADED = "keep_loaded"
OFFLOAD_AFTER_RUN = "offload_after_run"
CPU_OFFLOAD = "cpu_offload"  # the core's "model" offload (the name saved workflows use)
NO_QUANTIZATION = "none"


def offload_memory_mode(core_mode: str) -> str:
    """The loader's ``memory`` choice for one of the core's offload modes."""
    return CPU_OFFLOAD if core_mode == "model" else f"{core_mode}_offload"


def memory_modes() -> list[str]:
    """The loader's ``memory`` choices: ComfyUI-managed residency, then the core's offload ladder."""
    return [KEEP_LOADED, OFFLOAD_AFTER_RUN] + [offload_memory_mode(m) for m in core().offload.MODES]


def quantization_modes() -> list[str]:
    """The loader's ``quantization`` choices: full precision, then the core's modes."""
    return [NO_QUANTIZATION, *core().quantization.MODES]


def core_offload_mode(memory_mode: str) -> str | None:
    """The core's offload mode behind a ``memory`` choice (None: ComfyUI moves the model)."""
    return next((m for m in core().offload.MODES if offload_memory_mode(m) == memory_mode), None)


@dataclass(frozen=True)
class LoadSettings:
    """Everything that identifies a loaded model."""

    path: str
    dtype: str = "auto"
    device: str = "auto"
    memory: str = KEEP_LOADED
    quantization: str = NO_QUANTIZATION


class InternVLUModel:
    """A loaded (or unloadable) InternVL-U pipeline plus its place in ComfyUI's memory manager."""

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self._pipe: Any = None
        self._patcher: Any = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = "loaded" if self._pipe is not None else "not loaded"
        return f"InternVLUModel({self.settings.path!r}, {state})"

    @property
    def is_loaded(self) -> bool:
        """Whether the weights are in memory (on any device)."""
        return self._pipe is not None

    @property
    def patcher(self) -> Any:
        """The ComfyUI ModelPatcher registered for this model (None outside ComfyUI)."""
        return self._patcher

    def pipeline(self) -> Any:
        """The core pipeline, loading the weights if needed."""
        with self._lock:
            if self._pipe is None:
                self._load()
            return self._pipe

    def _load(self) -> None:
        load_device, offload_device = resolve_devices(self.settings.device)
        dtype = resolve_dtype(self.settings.dtype, load_device)
        offload = core_offload_mode(self.settings.memory)
        quantization = None if self.settings.quantization == NO_QUANTIZATION else self.settings.quantization
        log.info("InternVL-U: loading %s (%s, quantization %s, memory %s) for %s", self.settings.path, dtype,
                 self.settings.quantization, self.settings.memory, load_device)
        # Offloading and quantisation happen on the run device (the core checks both before loading);
        # otherwise the weights load where ComfyUI keeps them between runs.
        pipe = core().InternVLUPipeline.from_pretrained(
            self.settings.path, torch_dtype=dtype,
            device=str(load_device if offload or quantization else offload_device),
            quantization=quantization, offload=offload,
        )
        self._load_device, self._offload_device = load_device, offload_device
        if offload is None:
            self._patcher = memory.make_patcher(pipe, load_device, offload_device)
        self._pipe = pipe

    @contextmanager
    def use(self, loras: tuple[tuple[str, float], ...] = ()) -> Iterator[Any]:
        """The pipeline on its run device for one job; offloads afterwards if so configured.

        ``loras``: ``(adapter file, strength)`` pairs switched on for this job (the LoRA node's handles
        pass them); every other loaded adapter is off, so a branch without LoRA nodes gets the base model.
        """
        with self._lock:
            pipe = self.pipeline()
            self._activate_loras(pipe, loras)
            if self._patcher is not None:
                memory.load(self._patcher)
            elif pipe.offload_mode is None:
                pipe.to(str(self._load_device))
            try:
                yield pipe
            finally:
                if loras:  # between jobs the shared pipeline is the base model
                    pipe.set_loras({})
                if self.settings.memory == OFFLOAD_AFTER_RUN:
                    self.offload()

    def _activate_loras(self, pipe: Any, loras: tuple[tuple[str, float], ...]) -> None:
        """Switch on exactly ``loras`` (the core loads the files it has not loaded yet)."""
        if loras or len(pipe.loras):
            pipe.loras.activate_files(loras)

    def offload(self) -> None:
        """Free the accelerator: move the weights to the offload device (they stay in RAM)."""
        with self._lock:
            if self._pipe is None:
                return
            if self._patcher is not None:
                memory.unload(self._patcher)
            elif self._pipe.offload_mode is not None:
                self._pipe.release_accelerator()
            else:
                self._pipe.to(str(self._offload_device))
            memory.empty_cache()

    def release(self) -> None:
        """Free the weights entirely; the next job loads them again from disk."""
        with self._lock:
            self.offload()
            self._pipe = None
            self._patcher = None
            gc.collect()
            memory.empty_cache()

    def to_comfy_latent(self, pipe: Any, latents: Any) -> dict[str, Any]:
        """A job's final latents as ComfyUI's LATENT: VAE-space ``[N, 16, 1, H/8, W/8]`` float32 (the
        layout ComfyUI's own Qwen-Image VAE nodes read and write, the Wan 2.1 latent space)."""
        return {"samples": pipe.to_vae_latents(latents).unsqueeze(2).cpu()}

    def images_from_comfy_latent(self, pipe: Any, latent: dict[str, Any]) -> list[Any]:
        """The images a ComfyUI LATENT holds, decoded with this model's VAE (``pipe`` from :meth:`use`)."""
        return pipe.decode_latents(pipe.from_vae_latents(latent["samples"]))


class ModelHandle(Protocol):
    """What nodes use of an ``INTERNVLU_MODEL``, whether loaded here or served elsewhere."""

    def use(self) -> AbstractContextManager[Any]:
        """The model for one job: ``understand``, ``understand_each``, ``reason``, ``generate``, ``edit``
        and ``decode_latents_preview``, as ``InternVLUPipeline`` has them."""
        ...

    def offload(self) -> None:
        """Free the accelerator."""
        ...

    def release(self) -> None:
        """Free the weights (or connection); the next job brings them back."""
        ...

    def to_comfy_latent(self, pipe: Any, latents: Any) -> dict[str, Any]:
        """The LATENT output of a job whose step callback last saw ``latents``."""
        ...

    def images_from_comfy_latent(self, pipe: Any, latent: dict[str, Any]) -> list[Any]:
        """The images of a LATENT input, for a job on ``pipe``."""
        ...


_models: weakref.WeakValueDictionary[LoadSettings, InternVLUModel] = weakref.WeakValueDictionary()
_models_lock = threading.Lock()


def get_model(settings: LoadSettings) -> InternVLUModel:
    """The shared model for these settings: loaders with equal settings reuse one copy."""
    with _models_lock:
        model = _models.get(settings)
        if model is None:
            model = InternVLUModel(settings)
            _models[settings] = model
        return model
