"""Random, unguessable ids for images and reasonings produced by the tools."""

from __future__ import annotations

import re
import secrets

IMAGE_PREFIX = "img_"
REASONING_PREFIX = "rsn_"
_TOKEN_BYTES = 6  # 12 hex digits: short enough for a model to copy, too many to guess

IMAGE_ID_PATTERN = re.compile(r"img_[0-9a-f]{12}")


def new_image_id() -> str:
    """Return a fresh image id such as `img_3f9a1c0b7e2d`."""
    return IMAGE_PREFIX + secrets.token_hex(_TOKEN_BYTES)


def new_reasoning_id() -> str:
    """Return a fresh reasoning id such as `rsn_0c41d9e27a5b`."""
    return REASONING_PREFIX + secrets.token_hex(_TOKEN_BYTES)


def is_image_id(text: str) -> bool:
    """Whether `text` has the exact shape of an image id."""
    return IMAGE_ID_PATTERN.fullmatch(text) is not None


def looks_like_image_id(text: str) -> bool:
    """Whether `text` was meant as an image id (even a mistyped one) rather than a path."""
    return text.startswith(IMAGE_PREFIX) and re.fullmatch(r"img_[\w-]*", text) is not None
