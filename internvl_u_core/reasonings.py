"""Keeps `reason` results under ids, so a later generate/edit call can follow one by name.

Agent tools and servers hand a model a reasoning id instead of the `Reasoning` object; the
id is random (unguessable) and the store is bounded, oldest entries dropped first.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError
from .pipeline import Reasoning

_REASONING_ID_PREFIX = "rsn_"


@dataclass(frozen=True)
class StoredReasoning:
    """A `Reasoning` under its id, with a description of the input images it was made for."""

    reasoning_id: str
    reasoning: Reasoning
    input_images: tuple[dict[str, Any], ...] = field(default=())


class ReasoningStore:
    """Thread-safe, bounded map from reasoning ids to reasonings (oldest dropped first)."""

    def __init__(self, max_entries: int = 256) -> None:
        self._entries: OrderedDict[str, StoredReasoning] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()

    def add(self, reasoning: Reasoning, input_images: tuple[dict[str, Any], ...] = ()) -> StoredReasoning:
        """Store `reasoning` under a new random id such as `rsn_0c41d9e27a5b`."""
        entry = StoredReasoning(_REASONING_ID_PREFIX + secrets.token_hex(6), reasoning, input_images)
        with self._lock:
            self._entries[entry.reasoning_id] = entry
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return entry

    def get(self, reasoning_id: str) -> StoredReasoning:
        """Return the stored reasoning or raise an `InvalidInputError` the caller can act on."""
        with self._lock:
            entry = self._entries.get(reasoning_id.strip())
        if entry is None:
            raise InvalidInputError(
                f"Unknown reasoning id '{reasoning_id}'. Use a reasoning_id exactly as the "
                "reason tool returned it, or call reason again."
            )
        return entry
