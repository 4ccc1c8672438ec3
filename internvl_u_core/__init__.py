"""InternVL-U: understanding, reasoning, text-to-image and editing in one model.

Our own implementation of the released checkpoint layout; no ``trust_remote_code``.
"""

from .errors import (
    GenerationCancelled,
    InternVLUError,
    InvalidInputError,
    InvalidInputTypeError,
    ModelLoadError,
)
from .pipeline import InternVLUPipeline, InternVLUPipelineOutput, Reasoning
from .remote import RemoteError, RemoteInternVLU

__all__ = [
    "GenerationCancelled",
    "InternVLUError",
    "InternVLUPipeline",
    "InternVLUPipelineOutput",
    "InvalidInputError",
    "InvalidInputTypeError",
    "ModelLoadError",
    "Reasoning",
    "RemoteError",
    "RemoteInternVLU",
]
__version__ = "0.1.0"
