"""The ``INTERNVLU_MODEL`` of a model served by ``internvl-u serve``: the same handle, over HTTP.

The server owns the weights and the accelerator: there is nothing to load, offload or register with
ComfyUI's memory manager, and jobs go to the core's ``RemoteInternVLU``. Its step callbacks carry
the server's previews, not latents, so the LATENT output holds none and says so when a node reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .core_import import core

NO_LATENTS = (
    "InternVL-U: this LATENT comes from a served model (InternVL-U Remote Loader), which sends images, not "
    "latents. Use the node's 'images' output instead (VAE Encode it if a node needs a latent), or load the "
    "model locally with InternVL-U Loader."
)
NO_LATENT_INPUT = (
    "InternVL-U Edit: 'image_latent' needs a model loaded here (InternVL-U Loader); a served model takes "
    "images. Decode the latent with VAE Decode and connect it to 'image'."
)


class ServedLatent(dict):
    """Generate/Edit's LATENT for a served model: empty, and reading its samples explains why."""

    def __missing__(self, key: str) -> Any:
        if key == "samples":
            raise ValueError(NO_LATENTS)
        raise KeyError(key)


@dataclass(frozen=True)
class RemoteSettings:
    """Where the server is; the key itself is kept out of settings (and so out of workflows)."""

    base_url: str
    api_key_env: str
    timeout: float


class RemoteModel:
    """A model served by ``internvl-u serve``, offering nodes what a loaded one does (``ModelHandle``)."""

    def __init__(self, settings: RemoteSettings, api_key: str | None) -> None:
        self.settings = settings
        self._api_key = api_key or ""  # "": send none (not the client's own environment default)
        self._client: Any = None
        self._lock = threading.Lock()
        self._jobs: dict[int, int] = {}  # id(client) -> jobs using it: a client is closed only when none does

    def __repr__(self) -> str:
        return f"RemoteModel({self.settings.base_url!r})"

    @property
    def is_loaded(self) -> bool:
        """Whether a connection to the server is open."""
        return self._client is not None

    def client(self) -> Any:
        """The core's ``RemoteInternVLU`` for the server, created on first use."""
        with self._lock:
            return self._open()

    def _open(self) -> Any:
        if self._client is None:
            self._client = core().RemoteInternVLU(
                self.settings.base_url, api_key=self._api_key, timeout=self.settings.timeout
            )
        return self._client

    @contextmanager
    def use(self) -> Iterator[Any]:
        """The client for one job (kept open until the job ends, even if the model is released meanwhile);
        a refused key is explained in the loader's terms."""
        with self._lock:
            client = self._open()
            self._jobs[id(client)] = self._jobs.get(id(client), 0) + 1
        try:
            yield client
        except core().RemoteError as error:
            if error.status_code != 401:
                raise
            where = self.settings.api_key_env or "(none given)"
            raise core().RemoteError(
                f"{error} Set the environment variable named in the Remote Loader's 'api_key_env' ({where}) to "
                "the server's --api-key before starting ComfyUI.",
                status_code=error.status_code, code=error.code,
            ) from error
        finally:
            with self._lock:
                self._jobs[id(client)] -= 1
                if not self._jobs[id(client)]:
                    del self._jobs[id(client)]
                    if client is not self._client:  # released while this job ran: the last job closes it
                        client.close()

    def offload(self) -> None:
        """Nothing to free here: the model's memory is the server's."""

    def release(self) -> None:
        """Close the connection (after the jobs that use it end); the next job opens a new one."""
        with self._lock:
            if self._client is not None and id(self._client) not in self._jobs:
                self._client.close()
            self._client = None

    def to_comfy_latent(self, pipe: Any, latents: Any) -> dict[str, Any]:
        return ServedLatent()

    def images_from_comfy_latent(self, pipe: Any, latent: dict[str, Any]) -> list[Any]:
        raise ValueError(NO_LATENT_INPUT)
