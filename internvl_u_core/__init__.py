"""InternVL-U: understanding, reasoning, text-to-image and editing in one model.

Our own implementation of the released checkpoint layout; no ``trust_remote_code``.
"""

from .errors import (
    CheckpointNotDownloaded,
    GenerationCancelled,
    InternVLUError,
    InvalidInputError,
    InvalidInputTypeError,
    ModelLoadError,
)
from .limits import DEFAULT_LIMITS, Limits, random_seed
from .loading import DEFAULT_HUB_ID, download_checkpoint
from .pipeline import InternVLUPipeline, InternVLUPipelineOutput, Reasoning
from .remote import RemoteError, RemoteInternVLU

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
