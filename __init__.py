"""ComfyUI entry module of the InternVL-U node pack (ComfyUI >= 0.3.48, V3 node API).

Importing this module is cheap on purpose: it imports neither torch nor the model code. ComfyUI
calls :func:`comfy_entrypoint`, which checks the dependencies and builds the nodes.
"""

from __future__ import annotations

from typing import Any

WEB_DIRECTORY = "./nodes/web"


class InternVLUUnavailable(RuntimeError):
    """The nodes cannot be registered; the message says why and how to fix it."""


async def comfy_entrypoint() -> Any:
    """Called by ComfyUI when it loads custom nodes; returns the pack's ``ComfyExtension``.

    A missing dependency raises one exception whose message ComfyUI logs as a single line
    ("Error while calling comfy_entrypoint in <pack>: InternVL-U nodes disabled: ...").
    """
    from .nodes.dependencies import install_hint, missing_dependencies

    missing = missing_dependencies()
    if missing:
        message = f"InternVL-U nodes disabled: missing Python package(s) {', '.join(missing)}. {install_hint(missing)}"
        raise InternVLUUnavailable(message)
    from .nodes.comfy_v3 import build_extension

    return build_extension()
