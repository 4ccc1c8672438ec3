"""What the agent's model reads: text, plus image blocks only when the application opts in."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from langchain_core.messages.content import create_image_block, create_text_block
from PIL import Image

from agent_tools.images import StoredImage
from agent_tools.session import ReturnImages
from internvl_u_core.files import png_bytes

ToolContent = str | list[dict[str, Any]]


def tool_content(
    text: str,
    images: Sequence[tuple[StoredImage, Image.Image]] = (),
    *,
    return_images: ReturnImages = "none",
    thumbnail_size: int = 256,
) -> ToolContent:
    """Return `text` alone, or text and standard image blocks when `return_images` asks."""
    if return_images == "none" or not images:
        return text
    blocks: list[dict[str, Any]] = [dict(create_text_block(text))]
    for stored, image in images:
        shown = _thumbnail(image, thumbnail_size) if return_images == "thumbnail" else image
        block = create_image_block(base64=_png_base64(shown), mime_type="image/png")
        blocks.append({**block, "extras": {"image_id": stored.image_id}})
    return blocks


def truncate(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters, saying that it was cut."""
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + f" [... {len(text) - limit} more characters in the artifact]"


def _thumbnail(image: Image.Image, size: int) -> Image.Image:
    copy = image.copy()
    copy.thumbnail((size, size))
    return copy


def _png_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")
