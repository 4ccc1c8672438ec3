"""Devices and memory: where the components live, offloading, tiling, compiling, sizes."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from . import offload as offloading
from . import quantization as quantizing
from . import validation as check
from .errors import InvalidInputError
from .pipeline_loading import _check_offload_with

if TYPE_CHECKING:
    from .pipeline import InternVLUPipeline


class PipelineDevices:
    """Device placement and memory of the pipeline's components (a part of :class:`InternVLUPipeline`)."""

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        parts = {"vlm": self.vlm, "generation_decoder": self.generation_decoder, "vae": self.vae}
        return {name: module for name, module in parts.items() if module is not None}

    @property
    def device(self) -> torch.device:
        return self._offload.device if self._offload is not None else next(self.vlm.parameters()).device

    @property
    def offload_mode(self) -> str | None:
        """The active offload mode (``model``, ``group``, ``sequential``), or None."""
        return self._offload.mode if self._offload is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vlm.parameters()).dtype

    def to(self, device: str | torch.device) -> InternVLUPipeline:
        device = check.device(device)
        with self._lock:
            if self._offload is not None:
                self._offload.remove()
                self._offload = None
            for module in self.components.values():
                module.to(device)
        return self

    def enable_offload(self, mode: str = "model", device: str | torch.device | None = None) -> None:
        """Keep the weights in CPU memory and move them to ``device`` (default: CUDA) while they run.

        ``mode``: ``"model"`` moves whole components, ``"group"`` streams the ViT, LLM and DiT blocks
        one at a time, ``"sequential"`` moves every layer for its own call (least GPU memory, slowest);
        see ``internvl_u_core.offload``. ``pipe.to(device)`` switches offloading off again.
        """
        mode = offloading.check_mode(mode)
        if mode is None:
            raise InvalidInputError("offload=None: pass one of model, group, sequential, or call pipe.to(device)")
        self._enable_offload(mode, offloading.check_device(mode, device))

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Keep components on the CPU and move each to ``device`` (default: CUDA) only while it runs."""
        self._enable_offload("model", offloading.check_device("model", device, option="enable_model_cpu_offload()"))

    def release_accelerator(self) -> None:
        """Under offloading, move every weight back to the CPU memory (frees the GPU between jobs)."""
        with self._lock:
            if self._offload is not None:
                self._offload.activate(self.components, None)

    def _enable_offload(self, mode: str, device: torch.device) -> None:
        _check_offload_with(self.quantization, mode)
        with self._lock:
            if self._offload is not None:
                self._offload.remove()
            self._offload = offloading.attach(self.components, mode, device)

    def enable_vae_tiling(self, enabled: bool = True) -> None:
        """Decode/encode large images in overlapping tiles to cap VAE memory (results differ slightly at seams)."""
        if self.vae is None:
            return
        if enabled:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()

    def compile_transformer(self, **compile_kwargs) -> None:
        """Opt-in regional ``torch.compile`` of the DiT's repeated blocks (same numbers; pays off on CUDA).

        The first image compiles (tens of seconds); a new size or batch layout compiles again.
        ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``).
        """
        self._require_generation()
        self.generation_decoder.decoder.compile_repeated_blocks(fullgraph=True, **compile_kwargs)

    def model_size_bytes(self) -> int:
        """Bytes of all weights and buffers as stored (quantised weights at their packed size)."""
        return sum(quantizing.module_bytes(module) for module in self.components.values())

    def _activate(self, module: torch.nn.Module) -> torch.device:
        """Device a component runs on now (moving it, or its whole-moving parts, there first under offload)."""
        if self._offload is not None:
            return self._offload.activate(self.components, module)
        return next(module.parameters()).device

    def _require_generation(self) -> None:
        if self.generation_decoder is None:
            raise InvalidInputError("this pipeline was loaded without the image components; load it with them to draw")

    @contextlib.contextmanager
    def _releasing_accelerator_on_failure(self):
        """A cancelled or failed run leaves nothing behind on the accelerator."""
        try:
            yield
        except BaseException:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
