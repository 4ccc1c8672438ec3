"""The LoRA part of ``InternVLUPipeline``: load, switch and remove adapters (the work is in ``lora``)."""

from __future__ import annotations

import os


class LoraAdapters:
    """``load_lora``/``set_loras``/``remove_lora``, under the pipeline's lock so no job sees a half-switched model."""

    def load_lora(self, path_or_hub_id: str | os.PathLike, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Load a LoRA adapter file (or ``owner/repo[/file.safetensors]``) and switch it on at ``scale``.

        Several adapters can be on at once, each at its own scale. An adapter made for another model
        (other widths, keys or shapes) is refused with the mismatch named. Returns the adapter's name.
        """
        with self._lock:
            return self.loras.load(path_or_hub_id, adapter_name, scale)

    def set_loras(self, scales: dict[str, float]) -> None:
        """Exactly the named loaded adapters on, at these scales (``{}``: all off, the exact base outputs)."""
        with self._lock:
            self.loras.set_active(scales)

    def remove_lora(self, adapter_name: str | None = None) -> None:
        """Unload one adapter, or all of them (``None``); with none left the model is the base model again."""
        with self._lock:
            self.loras.remove(adapter_name)
