"""Image inputs and outputs of the tools: ids, confined paths, limits, PNG files."""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.tools import ToolException
from PIL import Image, UnidentifiedImageError

from agent_tools.ids import is_image_id, looks_like_image_id, new_image_id
from agent_tools.paths import resolve_allowed_path

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


@dataclass(frozen=True)
class StoredImage:
    """Where an image lives on disk, and its id when the tools wrote it."""

    path: Path
    width: int
    height: int
    image_id: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata for tool artifacts."""
        return {
            "image_id": self.image_id,
            "path": str(self.path),
            "width": self.width,
            "height": self.height,
        }

    def label(self) -> str:
        """One-line description for the text the model reads."""
        name = self.image_id or str(self.path)
        return f"{name}: {self.width}x{self.height} PNG at {self.path}"


@dataclass(frozen=True)
class LoadedImage:
    """An input image decoded to RGB, with the reference the agent used."""

    ref: str
    image: Image.Image
    source: StoredImage

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata for tool artifacts."""
        return {"ref": self.ref, **self.source.describe()}


class ImageStore:
    """Resolves image references and saves results as PNG files under `output_dir`.

    A reference is an image id written by this store (`img_...`) or a file path inside
    `allowed_dirs` or `output_dir`. Nothing else on disk can be read through it.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        allowed_dirs: Sequence[str | os.PathLike[str]] = (),
        *,
        max_input_bytes: int,
        max_input_pixels: int,
    ) -> None:
        self.output_dir = Path(output_dir).resolve()
        self.allowed_dirs = [Path(folder).resolve() for folder in allowed_dirs]
        self.max_input_bytes = max_input_bytes
        self.max_input_pixels = max_input_pixels

    def load(self, ref: str) -> LoadedImage:
        """Decode the image an agent referred to, or raise a `ToolException` it can act on."""
        ref = ref.strip()
        if not ref:
            raise ToolException("An image reference is empty. Pass an image_id or a file path.")
        if _URL.match(ref):
            raise ToolException(
                f"'{ref[:60]}' is a URL or inline data, which is not accepted. "
                "Pass an image_id from an earlier result or a file path."
            )
        if looks_like_image_id(ref):
            path = self._path_of_id(ref)
        else:
            path = resolve_allowed_path(ref, [*self.allowed_dirs, self.output_dir])
        image = self._decode(ref, self._read_bytes(ref, path))
        image_id = path.stem if path.parent == self.output_dir and is_image_id(path.stem) else None
        source = StoredImage(path=path, width=image.width, height=image.height, image_id=image_id)
        return LoadedImage(ref=ref, image=image, source=source)

    def save(self, image: Image.Image) -> StoredImage:
        """Write `image` as `<output_dir>/<new id>.png` and return where it went."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        image_id = new_image_id()
        path = self.output_dir / f"{image_id}.png"
        while path.exists():
            image_id = new_image_id()
            path = self.output_dir / f"{image_id}.png"
        partial = self.output_dir / f".{image_id}.partial"
        image.save(partial, format="PNG")
        os.replace(partial, path)
        return StoredImage(path=path, width=image.width, height=image.height, image_id=image_id)

    def add(self, source: Image.Image | str | os.PathLike[str]) -> StoredImage:
        """Register an image supplied by the application (trusted) and give it an id.

        Use this for user uploads, then tell the model the returned `image_id`.
        """
        if isinstance(source, Image.Image):
            return self.save(source.convert("RGB"))
        with Image.open(source) as image:
            return self.save(image.convert("RGB"))

    def _path_of_id(self, image_id: str) -> Path:
        path = self.output_dir / f"{image_id}.png"
        if not is_image_id(image_id) or not path.is_file():
            raise ToolException(
                f"Unknown image id '{image_id}'. Use an image_id exactly as an earlier "
                "tool result gave it (like 'img_3f9a1c0b7e2d'), or a file path."
            )
        return path

    def _read_bytes(self, ref: str, path: Path) -> bytes:
        limit = self.max_input_bytes
        try:
            descriptor = os.open(path, _OPEN_FLAGS)
        except OSError as error:
            raise ToolException(f"Cannot open '{ref}': {error.strerror}.") from error
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            os.close(descriptor)
            raise ToolException(f"'{ref}' is not a regular file.")
        with os.fdopen(descriptor, "rb") as file:
            data = file.read(limit + 1)
        if info.st_size > limit or len(data) > limit:
            raise ToolException(
                f"'{ref}' is {max(info.st_size, len(data)) / 2**20:.1f} MiB; input images "
                f"may be at most {limit / 2**20:.1f} MiB. Use a smaller file."
            )
        return data

    def _decode(self, ref: str, data: bytes) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
                if width * height > self.max_input_pixels:
                    raise ToolException(
                        f"'{ref}' is {width}x{height} pixels; input images may have at "
                        f"most {self.max_input_pixels} pixels. Use a smaller image."
                    )
                return image.convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError) as error:
            raise ToolException(
                f"'{ref}' is not an image this tool reads "
                f"({', '.join(ACCEPTED_FORMATS)}, at most {self.max_input_pixels} pixels)."
            ) from error
        except (OSError, SyntaxError) as error:
            raise ToolException(f"'{ref}' could not be decoded: {error}.") from error
