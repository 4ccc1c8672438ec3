"""Importing ``internvl_u_core``: the copy inside this pack first, else an installed one."""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType

from .dependencies import install_hint, missing_dependencies


class MissingDependencyError(ImportError):
    """A Python package the InternVL-U nodes need is not installed in ComfyUI's environment."""


@lru_cache(maxsize=1)
def core() -> ModuleType:
    """The ``internvl_u_core`` module, with a clear message when a dependency is missing."""
    missing = missing_dependencies()
    if missing:
        raise MissingDependencyError(missing_dependency_message(missing))
    pack = (__package__ or "").rpartition(".")[0]
    if pack:  # loaded as <pack>.nodes inside ComfyUI: use the core shipped next to it
        try:
            return importlib.import_module(".internvl_u_core", pack)
        except ModuleNotFoundError as error:
            if error.name != f"{pack}.internvl_u_core":
                raise
    return importlib.import_module("internvl_u_core")


def missing_dependency_message(missing: list[str]) -> str:
    return (
        f"InternVL-U nodes need the Python package(s) {', '.join(missing)}, which are not installed "
        f"in ComfyUI's Python. {install_hint(missing)}"
    )
