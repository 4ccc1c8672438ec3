"""The ComfyUI core nodes the workflows use, as the frontend and the server see them.

``inputs``: (name, type) in ``input_order``; ``ui_widgets``: frontend-only widgets stored in
``widgets_values`` but not sent to the server; ``outputs``: the leading outputs the workflows use
(newer ComfyUI appends some, e.g. SaveImage's IMAGE). The real-ComfyUI test checks this table
against ``GET /object_info``.
"""

from __future__ import annotations

CORE_NODES: dict[str, dict] = {
    "LoadImage": {
        "inputs": [("image", "COMBO")],
        "ui_widgets": ["upload"],
        "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    },
    "SaveImage": {
        "inputs": [("images", "IMAGE"), ("filename_prefix", "STRING")],
        "outputs": [],
        "output_node": True,
    },
    "PreviewImage": {
        "inputs": [("images", "IMAGE")],
        "outputs": [],
        "output_node": True,
    },
    "ImageInvert": {
        "inputs": [("image", "IMAGE")],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "VAELoader": {
        "inputs": [("vae_name", "COMBO")],
        "outputs": [("VAE", "VAE")],
    },
    "VAEDecode": {
        "inputs": [("samples", "LATENT"), ("vae", "VAE")],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "ImageBatch": {
        "inputs": [("image1", "IMAGE"), ("image2", "IMAGE")],
        "outputs": [("IMAGE", "IMAGE")],
    },
}

#: Frontend-only nodes: kept in UI workflows, never sent to the server.
VIRTUAL_NODES = frozenset({"MarkdownNote", "Note"})

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
