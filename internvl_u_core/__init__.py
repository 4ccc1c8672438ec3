"""InternVL-U: understanding, reasoning, text-to-image and editing in one model.

Our own implementation of the released checkpoint layout; no ``trust_remote_code``.
"""

from importlib import import_module
from importlib.util import find_spec

from .errors import (
    CheckpointNotDownloaded,
    GenerationCancelled,
    InternVLUError,
    InvalidInputError,
    InvalidInputTypeError,
    ModelLoadError,
)
from .limits import DEFAULT_LIMITS, Limits, random_seed
from .options import DEFAULT_HUB_ID

# The names below need torch; they are imported on first use (PEP 562), so that the command line's
# --help and the adapters' light modules can import this package without paying for torch.
_LAZY = {
    "download_checkpoint": ".download",
    "InternVLUPipeline": ".pipeline",
    "InternVLUPipelineOutput": ".pipeline",
    "Reasoning": ".pipeline",
    "RemoteError": ".remote",
    "RemoteInternVLU": ".remote",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. .offload
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_HUB_ID",
    "DEFAULT_LIMITS",
    "CheckpointNotDownloaded",
    "GenerationCancelled",
    "InternVLUError",
    "InternVLUPipeline",
    "InternVLUPipelineOutput",
    "InvalidInputError",
    "InvalidInputTypeError",
    "Limits",
    "ModelLoadError",
    "Reasoning",
    "RemoteError",
    "RemoteInternVLU",
    "download_checkpoint",
    "random_seed",
]
__version__ = "0.1.0"
