"""Confine file paths given by an agent to the folders the application allows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from langchain_core.tools import ToolException


def resolve_allowed_path(ref: str, roots: Sequence[Path]) -> Path:
    """Return the real path of `ref` if it lies inside one of `roots`.

    `..` parts are collapsed and checked before anything on disk is looked at, so the
    answer never reveals whether a file outside the roots exists; symlinks are then
    resolved and checked again, so a link inside a root cannot lead out of it.
    Relative paths are tried against each root in order.
    """
    if not roots:
        raise ToolException(
            f"Cannot read '{ref}': no input folders are configured. Use an image_id from an earlier result instead."
        )
    real_roots = [root.resolve() for root in roots]
    try:
        candidate = Path(ref)
        bases = [None] if candidate.is_absolute() else real_roots
        within = [Path(os.path.normpath(base / candidate if base else candidate)) for base in bases]
        within = [path for path in within if _inside(path, [*real_roots, *map(_absolute, roots)])]
        if not within:
            raise _outside(ref, real_roots)
        for path in within:
            if os.path.lexists(path):
                real = path.resolve()
                if not _inside(real, real_roots):
                    raise _outside(ref, real_roots)
                return real
    except (OSError, ValueError) as error:
        raise ToolException(f"'{ref}' is not a usable file path: {error}.") from error
    raise ToolException(
        f"No file at '{ref}' (looked in {_listing(real_roots)}). Check the name or use an image_id from an earlier result."
    )


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _outside(ref: str, roots: Sequence[Path]) -> ToolException:
    return ToolException(
        f"Path '{ref}' is outside the folders this tool may read ({_listing(roots)}). "
        "Use an image_id from an earlier result or a file inside those folders."
    )


def _listing(roots: Sequence[Path]) -> str:
    return ", ".join(str(root) for root in roots)
