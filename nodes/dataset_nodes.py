"""Thin file nodes for captioning datasets: load a folder of images, save captions beside copies.

ComfyUI's own folder loaders differ between versions (experimental ``LoadImageSetFromFolderNode``
in 0.3.x with no file names, ``LoadImageDataSetFromFolder`` later), so the pack ships these two.
Both stay inside ComfyUI's input and output folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .comfy_runtime import Progress, check_interrupt, input_directory, output_directory
from .images import pils_to_tensor, tensor_to_pils
from .schema import NODE_ID_PREFIX, InputSpec, NodeResult, NodeSpec, OutputSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _inside(base: Path, relative: str, name: str) -> Path:
    """``base/relative``, refusing absolute paths and ``..`` that would leave ``base``."""
    if os.path.isabs(relative):
        raise ValueError(f"{name} must be a folder relative to {base}, got the absolute path {relative!r}")
    path = Path(os.path.normpath(base / relative))
    if os.path.commonpath([path, os.path.normpath(base)]) != os.path.normpath(base):
        raise ValueError(f"{name} {relative!r} leaves {base}; use a folder inside it")
    return path


def load_image_folder(folder: str, limit: int) -> NodeResult:
    """Every image file of ``input/<folder>`` (sorted by name), one list item each at its own size."""
    path = _inside(input_directory(), folder, "folder")
    if not path.is_dir():
        raise FileNotFoundError(f"folder {folder!r} not found in ComfyUI's input folder ({path})")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        files = files[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    images = []
    for file in files:
        with Image.open(file) as picture:
            images.append(pils_to_tensor([ImageOps.exif_transpose(picture).convert("RGB")]))
    return NodeResult((images, [file.stem for file in files]), text=f"{len(files)} images from {path}")


LOAD_IMAGE_FOLDER = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}LoadImageFolder",
    display_name="InternVL-U Load Image Folder",
    description="Load every image of a folder inside ComfyUI's input folder, each at its own size, "
    "as a list (later nodes run once per image, or take the whole list).",
    inputs=(
        InputSpec(
            "folder",
            "STRING",
            "A folder inside ComfyUI's input folder (e.g. 'dataset' for ComfyUI/input/dataset).",
            default="dataset",
        ),
        InputSpec("limit", "INT", "Load at most this many images (sorted by name); 0 loads all.",
                  default=0, min=0, max=100000),
    ),
    outputs=(
        OutputSpec("images", "IMAGE", "The images, one list item each.", is_list=True),
        OutputSpec("names", "STRING", "The file names without extension, in the same order.", is_list=True),
    ),
    run=load_image_folder,
)


def save_captions(
    images: list[Any], captions: list[str], folder: list[str], names: list[str] | None = None
) -> NodeResult:
    """Write ``<name>.png`` and ``<name>.txt`` per image into ``output/<folder>`` (LoRA-trainer layout)."""
    pictures = [picture for batch in images for picture in tensor_to_pils(batch)]
    if len(captions) != len(pictures):
        raise ValueError(f"{len(pictures)} images but {len(captions)} captions; connect one caption per image")
    if names is not None and len(names) != len(pictures):
        raise ValueError(f"{len(pictures)} images but {len(names)} names; connect one name per image")
    stems = names or [f"image_{i:05d}" for i in range(1, len(pictures) + 1)]
    if len(set(stems)) != len(stems):
        raise ValueError("two images share a name; the files would overwrite each other")
    for stem in stems:
        if Path(stem).name != stem or stem in ("", ".", ".."):
            raise ValueError(f"name {stem!r} is not a plain file name")
    target = _inside(output_directory(), folder[0], "folder")
    target.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(pictures))
    for done, (picture, caption, stem) in enumerate(zip(pictures, captions, stems), start=1):
        check_interrupt()
        picture.save(target / f"{stem}.png")
        (target / f"{stem}.txt").write_text(caption.strip() + "\n", encoding="utf-8")
        progress.update(done, len(pictures))
    return NodeResult((str(target),), text=f"{len(pictures)} images and captions written to {target}")


SAVE_CAPTIONS = NodeSpec(
    node_id=f"{NODE_ID_PREFIX}SaveCaptions",
    display_name="InternVL-U Save Captions",
    description="Save each image as <name>.png with its caption in <name>.txt beside it, in a folder "
    "inside ComfyUI's output folder: the layout LoRA trainers read.",
    inputs=(
        InputSpec("images", "IMAGE", "The images (a list, or batches), in caption order."),
        InputSpec("captions", "STRING", "One caption per image (e.g. Understand's answers in per-image mode).",
                  force_input=True),
        InputSpec("folder", "STRING", "A folder inside ComfyUI's output folder; created if missing.",
                  default="captions"),
        InputSpec("names", "STRING", "Optional file names without extension, one per image (e.g. from "
                  "Load Image Folder); default image_00001, image_00002, ...", optional=True, force_input=True),
    ),
    outputs=(OutputSpec("folder_path", "STRING", "The folder the files were written to."),),
    run=save_captions,
    output_node=True,
    input_is_list=True,
)
