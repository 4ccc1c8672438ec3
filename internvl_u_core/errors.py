"""Exceptions raised by the public API.

Each one subclasses the built-in type a caller would naturally catch (``ValueError`` for bad
arguments, ``OSError`` for files that cannot be loaded), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class InternVLUError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(InternVLUError, ValueError):
    """An argument has a value the model cannot use; the message names it and what is allowed."""


class InvalidInputTypeError(InternVLUError, TypeError):
    """An argument has the wrong type; the message names it and the accepted types."""


class ModelLoadError(InternVLUError, OSError):
    """A checkpoint folder, file or hub id cannot be loaded; the message names the file."""


class CheckpointNotDownloaded(ModelLoadError):
    """A hub checkpoint is not in the local cache and downloads are switched off."""

    def __init__(self, hub_id: str):
        self.hub_id = hub_id
        super().__init__(
            f"{hub_id!r} is not in the local Hugging Face cache and offline mode is on "
            "(local_files_only=True or HF_HUB_OFFLINE=1); load it once with downloads allowed, or pass a "
            "checkpoint folder"
        )


class GenerationCancelled(InternVLUError):
    """A progress callback asked to stop; the pipeline is ready for the next call."""
