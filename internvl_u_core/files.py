"""Image files that adapters read and write for a caller they do not fully trust.

Agent tools and servers let a model or a remote client name images: by an id that an earlier
result gave (``img_3f9a1c0b7e2d``) or by a path. `ImageStore` turns such a reference into
pixels, but only for files inside the folders the application allows (`resolve_allowed_path`:
``..`` and symlinks cannot lead out), and writes results as PNG files under fresh, unguessable
ids, atomically, so a crash never leaves a half-written image behind. Every refusal is an
`InvalidInputError` whose message says what to pass instead.
"""

from __future__ import annotations

import base64
import io
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import InvalidInputError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
"""Image formats `ImageStore.load` decodes; anything else is refused before decoding."""

_IMAGE_ID_PREFIX = "img_"
_IMAGE_ID = re.compile(r"img_[0-9a-f]{12}")  # 12 hex digits: short enough to copy, too many to guess
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_BYTES_PER_PIXEL_BOUND = 4  # no accepted file of N pixels needs more than its raw 8-bit RGBA size


def resolve_allowed_path(ref: str, roots: Sequence[Path]) -> Path:
    """Return the real path of `ref` if it lies inside one of `roots`.

    `..` parts are collapsed and checked before anything on disk is looked at, so the
    answer never reveals whether a file outside the roots exists; symlinks are then
    resolved and checked again, so a link inside a root cannot lead out of it.
    A relative path is tried from the working directory first (``photos/lake.png`` with the root
    ``photos``, as a user types it in a shell), then against each root in order (``lake.png``);
    only the tries that land inside a root count, and the error lists them.
    """
    if not roots:
        raise InvalidInputError(
            f"Cannot read '{ref}': no input folders are configured. Use an image_id from an earlier result instead."
        )
    real_roots = [root.resolve() for root in roots]
    try:
        candidate = Path(ref)
        bases = [None] if candidate.is_absolute() else [Path.cwd(), *real_roots]
        tries = [Path(os.path.normpath(base / candidate if base else candidate)) for base in bases]
        within = list(dict.fromkeys(path for path in tries if _inside(path, [*real_roots, *map(_absolute, roots)])))
        if not within:
            raise _outside(ref, real_roots)
        for path in within:
            if os.path.lexists(path):
                real = path.resolve()
                if not _inside(real, real_roots):
                    raise _outside(ref, real_roots)
                return real
    except InvalidInputError:
        raise
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"'{ref}' is not a usable file path: {error}.") from error
    raise InvalidInputError(
        f"No file at '{ref}' (looked for {_listing(within)}; readable folders: {_listing(real_roots)}). "
        "Check the name or use an image_id from an earlier result."
    )


@dataclass(frozen=True)
class StoredImage:
    """Where an image lives on disk, and its id when an `ImageStore` wrote it."""

    path: Path
    width: int
    height: int
    image_id: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata for results."""
        return {
            "image_id": self.image_id,
            "path": str(self.path),
            "width": self.width,
            "height": self.height,
        }

    @property
    def name(self) -> str:
        """How results refer to it: its image id, else its path."""
        return self.image_id or str(self.path)

    def label(self) -> str:
        """One-line description for text a model reads."""
        return f"{self.name}: {self.width}x{self.height} PNG at {self.path}"


@dataclass(frozen=True)
class LoadedImage:
    """An input image decoded to RGB, with the reference the caller used."""

    ref: str
    image: Image.Image
    source: StoredImage

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata for results."""
        return {"ref": self.ref, **self.source.describe()}


class ImageStore:
    """Resolves image references and saves results as PNG files under `output_dir`.

    A reference is an image id written by this store (`img_...`) or a file path inside
    `allowed_dirs` or `output_dir`. Nothing else on disk can be read through it.

    Args:
        output_dir: where results are written as `<image_id>.png` (created when needed).
        allowed_dirs: folders, besides `output_dir`, whose image files may be read.
        max_input_pixels: larger input images are refused before they are decoded.
        max_input_bytes: larger input files are refused before they are read; by default
            the raw RGBA size of `max_input_pixels`, which no accepted format exceeds.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        allowed_dirs: Sequence[str | os.PathLike[str]] = (),
        *,
        max_input_pixels: int,
        max_input_bytes: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir).resolve()
        self.allowed_dirs = [Path(folder).resolve() for folder in allowed_dirs]
        self.max_input_pixels = max_input_pixels
        self.max_input_bytes = (
            _BYTES_PER_PIXEL_BOUND * max_input_pixels if max_input_bytes is None else max_input_bytes
        )

    def load(self, ref: str) -> LoadedImage:
        """Decode the image a caller referred to, or raise an `InvalidInputError` it can act on."""
        ref = ref.strip()
        if not ref:
            raise InvalidInputError("An image reference is empty. Pass an image_id or a file path.")
        if _URL.match(ref):
            raise InvalidInputError(
                f"'{ref[:60]}' is a URL or inline data, which is not accepted. "
                "Pass an image_id from an earlier result or a file path."
            )
        if _looks_like_image_id(ref):
            path = self._path_of_id(ref)
        else:
            path = resolve_allowed_path(ref, [*self.allowed_dirs, self.output_dir])
        image = self._decode(ref, self._read_bytes(ref, path))
        image_id = path.stem if path.parent == self.output_dir and _is_image_id(path.stem) else None
        source = StoredImage(path=path, width=image.width, height=image.height, image_id=image_id)
        return LoadedImage(ref=ref, image=image, source=source)

    def save(self, image: Image.Image) -> StoredImage:
        """Write `image` as `<output_dir>/<new id>.png` (complete or not at all); return where it went."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        image_id = _new_image_id()
        path = self.output_dir / f"{image_id}.png"
        while path.exists():
            image_id = _new_image_id()
            path = self.output_dir / f"{image_id}.png"
        write_atomically(path, png_bytes(image))
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
        if not _is_image_id(image_id) or not path.is_file():
            raise InvalidInputError(
                f"Unknown image id '{image_id}'. Use an image_id exactly as an earlier "
                "tool result gave it (like 'img_3f9a1c0b7e2d'), or a file path."
            )
        return path

    def _read_bytes(self, ref: str, path: Path) -> bytes:
        limit = self.max_input_bytes
        try:
            descriptor = os.open(path, _OPEN_FLAGS)
        except OSError as error:
            raise InvalidInputError(f"Cannot open '{ref}': {error.strerror}.") from error
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            os.close(descriptor)
            raise InvalidInputError(f"'{ref}' is not a regular file.")
        with os.fdopen(descriptor, "rb") as file:
            data = file.read(limit + 1)
        if info.st_size > limit or len(data) > limit:
            raise InvalidInputError(
                f"'{ref}' is {max(info.st_size, len(data)) / 2**20:.1f} MiB; input images "
                f"may be at most {limit / 2**20:.1f} MiB. Use a smaller file."
            )
        return data

    def _decode(self, ref: str, data: bytes) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
                if width * height > self.max_input_pixels:
                    raise InvalidInputError(
                        f"'{ref}' is {width}x{height} pixels; input images may have at "
                        f"most {self.max_input_pixels} pixels. Use a smaller image."
                    )
                return image.convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError) as error:
            raise InvalidInputError(
                f"'{ref}' is not an image this tool reads "
                f"({', '.join(ACCEPTED_FORMATS)}, at most {self.max_input_pixels} pixels)."
            ) from error
        except (OSError, SyntaxError) as error:
            raise InvalidInputError(f"'{ref}' could not be decoded: {error}.") from error


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` complete or not at all: a hidden temporary file beside it, flushed to
    disk (fsync), then renamed over ``path``; on any failure the temporary file is removed."""
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        with open(partial, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:  # the rename itself reaches the disk with the folder's entry
        folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows, where folders cannot be opened
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as a PNG file in memory (how adapters send pictures over a wire)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,…`` URI (OpenAI's and vLLM-Omni's inline images)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _new_image_id() -> str:
    return _IMAGE_ID_PREFIX + secrets.token_hex(6)


def _is_image_id(text: str) -> bool:
    return _IMAGE_ID.fullmatch(text) is not None


def _looks_like_image_id(text: str) -> bool:
    """Whether `text` was meant as an image id (even a mistyped one) rather than a path."""
    return text.startswith(_IMAGE_ID_PREFIX) and re.fullmatch(r"img_[\w-]*", text) is not None


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _outside(ref: str, roots: Sequence[Path]) -> InvalidInputError:
    return InvalidInputError(
        f"Path '{ref}' is outside the folders this tool may read ({_listing(roots)}). "
        "Use an image_id from an earlier result or a file inside those folders."
    )


def _listing(roots: Sequence[Path]) -> str:
    return ", ".join(str(root) for root in roots)
