"""ComfyUI nodes for InternVL-U.

The node modules are plain Python (importable without ComfyUI); ``comfy_v3`` builds the ComfyUI
V3 node classes from the declarations in :func:`all_specs`. Importing this package is cheap: the
node modules (which import torch) are loaded by :func:`all_specs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import NodeSpec


def all_specs() -> list[NodeSpec]:
    """Every node of the pack, in menu order."""
    from .dataset_nodes import LOAD_IMAGE_FOLDER, SAVE_CAPTIONS
    from .image_nodes import EDIT, GENERATE
    from .loader_nodes import LOADER, UNLOAD
    from .lora_nodes import LORA
    from .remote_nodes import REMOTE_LOADER
    from .text_nodes import REASON, UNDERSTAND

    return [LOADER, LORA, REMOTE_LOADER, UNDERSTAND, REASON, GENERATE, EDIT, UNLOAD, LOAD_IMAGE_FOLDER, SAVE_CAPTIONS]
