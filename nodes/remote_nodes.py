"""The Remote Loader node: a model served by ``internvl-u serve`` on the ``INTERNVLU_MODEL`` socket."""

from __future__ import annotations

import importlib.util
import os

from .core_import import MissingDependencyError, core, missing_dependency_message
from .dependencies import OPTIONAL
from .remote_model import RemoteModel, RemoteSettings
from .schema import MODEL_TYPE, NODE_ID_PREFIX, InputSpec, NodeResult, NodeSpec, OutputSpec

DEFAULT_URL = "http://127.0.0.1:8091"
MAX_TIMEOUT = 24 * 3600


def connect(base_url: str, api_key_env: str, timeout: int, api_key: str | None = None) -> NodeResult:
    """A handle on the server; the key comes from ``api_key`` or the environment variable named."""
    if importlib.util.find_spec("httpx") is None:
        raise MissingDependencyError(missing_dependency_message([OPTIONAL["httpx"]]))
    name = api_key_env.strip()
    key = api_key or (os.environ.get(name) if name else None)
    handle = RemoteModel(RemoteSettings(base_url.strip(), name, float(timeout)), key)
    handle.client()  # a malformed address is refused here, on the loader
    return NodeResult((handle,))


REMOTE_LOADER = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}RemoteLoader",
    display_name="InternVL-U Remote Loader",
    description="Use a model served by 'internvl-u serve' (on this or another machine) instead of loading "
    "one here: every InternVL-U node accepts its output. Progress, previews and Cancel work as with a local "
    "model; the LATENT outputs are not available.",
    inputs=(
        InputSpec(
            "base_url",
            "STRING",
            "The server's address, e.g. http://127.0.0.1:8091 or https://gpu-box.example:8091 "
            "(what 'internvl-u serve --host … --port …' listens on).",
            default=DEFAULT_URL,
        ),
        InputSpec(
            "api_key_env",
            "STRING",
            "Name of an environment variable of ComfyUI's process that holds the server's --api-key, so the "
            "key is never saved in the workflow (INTERNVL_U_API_KEY is also what 'internvl-u serve' reads for "
            "its key). Unset or empty: no key is sent.",
            default=core().remote.API_KEY_ENV,
        ),
        InputSpec(
            "timeout",
            "INT",
            "Seconds one job may take on the server (queueing included) before it is given up.",
            default=600,
            min=1,
            max=MAX_TIMEOUT,
        ),
        InputSpec(
            "api_key",
            "STRING",
            "Optional: the key itself, from another node (used instead of 'api_key_env'). Prefer "
            "'api_key_env': a key typed into a workflow is saved with it.",
            optional=True,
            force_input=True,
        ),
    ),
    outputs=(OutputSpec("model", MODEL_TYPE, "The served InternVL-U model."),),
    run=connect,
)
