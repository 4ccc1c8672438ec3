"""The tools' image store: the core's `ImageStore`, refusing bad references as `ToolException`s."""

from __future__ import annotations

from langchain_core.tools import ToolException

from internvl_u_core import InvalidInputError
from internvl_u_core.files import ImageStore as CoreImageStore
from internvl_u_core.files import LoadedImage, StoredImage

__all__ = ["ImageStore", "LoadedImage", "StoredImage"]


class ImageStore(CoreImageStore):
    """Resolves image ids and confined paths (see `internvl_u_core.files.ImageStore`).

    A reference the agent got wrong becomes a `ToolException` with the core's message, so the
    agent's model reads what to pass instead.
    """

    def load(self, ref: str) -> LoadedImage:
        """Decode the image an agent referred to, or raise a `ToolException` it can act on."""
        try:
            return super().load(ref)
        except InvalidInputError as error:
            raise ToolException(str(error)) from error
