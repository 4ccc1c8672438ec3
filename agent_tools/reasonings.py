"""The tools' reasoning store: the core's `ReasoningStore`, refusing unknown ids as `ToolException`s."""

from __future__ import annotations

from langchain_core.tools import ToolException

from internvl_u_core import InvalidInputError
from internvl_u_core.reasonings import ReasoningStore as CoreReasoningStore
from internvl_u_core.reasonings import StoredReasoning

__all__ = ["ReasoningStore", "StoredReasoning"]


class ReasoningStore(CoreReasoningStore):
    """Keeps `reason` results under ids (see `internvl_u_core.reasonings.ReasoningStore`)."""

    def get(self, reasoning_id: str) -> StoredReasoning:
        """Return the stored reasoning or raise a `ToolException` the agent can act on."""
        try:
            return super().get(reasoning_id)
        except InvalidInputError as error:
            raise ToolException(str(error)) from error
