"""Keeps `reason` results under ids so later generate/edit calls can use them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from langchain_core.tools import ToolException

from agent_tools.ids import new_reasoning_id


@dataclass(frozen=True)
class StoredReasoning:
    """A core `Reasoning` and the input images it was made for."""

    reasoning_id: str
    reasoning: Any  # internvl_u_core.Reasoning
    input_images: tuple[dict[str, Any], ...] = field(default=())


class ReasoningStore:
    """Thread-safe, bounded map from reasoning ids to reasonings (oldest dropped first)."""

    def __init__(self, max_entries: int = 256) -> None:
        self._entries: OrderedDict[str, StoredReasoning] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()

    def add(self, reasoning: Any, input_images: tuple[dict[str, Any], ...] = ()) -> StoredReasoning:
        """Store `reasoning` under a new random id."""
        entry = StoredReasoning(new_reasoning_id(), reasoning, input_images)
        with self._lock:
            self._entries[entry.reasoning_id] = entry
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return entry

    def get(self, reasoning_id: str) -> StoredReasoning:
        """Return the stored reasoning or raise a `ToolException` the agent can act on."""
        with self._lock:
            entry = self._entries.get(reasoning_id.strip())
        if entry is None:
            raise ToolException(
                f"Unknown reasoning id '{reasoning_id}'. Use a reasoning_id exactly as the "
                "reason tool returned it, or call reason again."
            )
        return entry
