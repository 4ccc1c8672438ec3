"""Prompts and images → model inputs, exactly as the released InternVL-U processor builds them.

Three conversation templates share one layout; image slots expand to ``<img><IMG_CONTEXT>×N</img>``;
generation modes add two guidance rows per prompt (instruction dropped, everything dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidInputError, ModelLoadError
from .loading import read_json

IMAGE_SLOT = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMG_UNCOND = "<img_uncond>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

SYSTEM_BASE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
SYSTEM_MESSAGES = {
    "qwen2_5-chat-v3": SYSTEM_BASE,
    "qwen2_5-chat-v3-imgen": SYSTEM_BASE
    + "请通过详细描述图像中物体和背景的颜色、形状、大小、纹理、数量、文字内容以及空间位置关系等来对图像进行全面描述：",
    "qwen2_5-chat-v3-editing": SYSTEM_BASE
    + "请描述输入图像的关键特征（颜色、形状、大小、纹理、物体、背景等），然后解释用户的文本指令应该如何改变或修改图像，"
    "从而生成一个满足用户要求的新图像，并适当保持与原始输入的一致性。：",
}
# User messages of the two dropped guidance rows (used verbatim, never normalised).
BLANK_ALL = "Here is a random image <img_uncond>:"
BLANK_TEXT_WITH_IMAGES = "Generate an image based on reference images."
_SENTENCE_END = tuple(".!?,:;")


def normalize_prompt(text: str, num_images: int) -> str:
    """Add missing ``<image>`` slots, strip, capitalise the first character, end with a period."""
    missing = num_images - text.count(IMAGE_SLOT)
    if num_images > 0 and missing > 0:
        text = (IMAGE_SLOT + "\n") * missing + text
    text = text.strip()
    if text:
        text = text[0].upper() + text[1:]
        if not text.endswith(_SENTENCE_END):
            text += "."
    return text


def render_conversation(system: str, user: str) -> str:
    return (
        f"{IM_START}system\n{system}{IM_END}\n"
        f"{IM_START}user\n{user}{IM_END}\n"
        f"{IM_START}assistant\n"
    )


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, max_length: int | None = None
) -> tuple[int, int]:
    """Size on a ``factor`` grid within a pixel budget (Python's round-half-to-even, as released)."""
    if height < factor or width < factor:
        raise InvalidInputError(
            f"image is {width}×{height} pixels; editing needs at least {factor}×{factor} pixels"
        )
    if max(height, width) / min(height, width) > 200:
        raise InvalidInputError(
            f"image is {width}×{height} pixels; its aspect ratio must be at most 200:1"
        )
    if max_length and max(height, width) > max_length:
        scale = max_length / max(height, width)
        height, width = int(height * scale), int(width * scale)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if max_length and max(h_bar, w_bar) > max_length:
        scale = max_length / max(h_bar, w_bar)
        h_bar = math.floor(h_bar * scale / factor) * factor
        w_bar = math.floor(w_bar * scale / factor) * factor
    # The released code can reach 0 for extreme aspect ratios; keep at least one grid cell.
    return max(h_bar, factor), max(w_bar, factor)


@dataclass
class VitImageSettings:
    """Understanding-image preprocessing (the ViT input)."""

    height: int = 448
    width: int = 448
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, data: dict) -> VitImageSettings:
        size = data.get("size") or {}
        if "height" in size and "width" in size:
            height, width = int(size["height"]), int(size["width"])
        else:
            height = width = int(size.get("shortest_edge", 448))
        return cls(
            height=height,
            width=width,
            image_mean=tuple(data.get("image_mean", cls.image_mean)),
            image_std=tuple(data.get("image_std", cls.image_std)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
        )

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, 3, H, W] float32: torch's uint8 antialiased bicubic resize, then fused rescale+normalise."""
        scale = 1.0 / self.rescale_factor
        mean = (torch.tensor(self.image_mean) * scale).view(3, 1, 1)
        std = (torch.tensor(self.image_std) * scale).view(3, 1, 1)
        out = []
        for image in images:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
            pixels = pixels.permute(2, 0, 1).unsqueeze(0)
            resized = F.interpolate(
                pixels, size=(self.height, self.width), mode="bicubic", antialias=True, align_corners=False
            )
            out.append((resized[0].to(torch.float32) - mean) / std)
        return torch.stack(out)


@dataclass
class GenImageSettings:
    """Generation-conditioning preprocessing (the VAE input of editing)."""

    patch_size: int = 8
    merge_size: int = 2
    min_pixels: int = 4096 * 64
    max_pixels: int = 16384 * 64
    max_length: int | None = None
    do_resize: bool = True
    do_pad: bool = False
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> GenImageSettings:
        ratio = float(data.get("gen_down_sample_ratio", 2))
        merge = round(1 / ratio) if ratio > 0 else 0
        if merge < 1 or abs(1 / merge - ratio) > 1e-9:
            raise ModelLoadError(f"{source}: gen_down_sample_ratio must be 1/k for an integer k ≥ 1, got {ratio}")
        if int(data.get("temporal_patch_size", 2)) != 1:
            raise ModelLoadError(f"{source}: temporal_patch_size must be 1 for InternVL-U inference")
        do_resize = bool(data.get("do_resize", True))
        do_pad = bool(data.get("do_pad", False))
        if do_resize and do_pad:
            raise ModelLoadError(f"{source}: do_resize and do_pad cannot both be true")
        patch = int(data.get("vae_downsample_factor", 8))
        return cls(
            patch_size=patch,
            merge_size=merge,
            min_pixels=int(data.get("min_dynamic_patch", 4096)) * patch * patch,
            max_pixels=int(data.get("max_dynamic_patch", 16384)) * patch * patch,
            max_length=data.get("max_length"),
            do_resize=do_resize,
            do_pad=do_pad,
            resample=int(data.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            image_mean=tuple(data.get("image_mean") or cls.image_mean),
            image_std=tuple(data.get("image_std") or cls.image_std),
        )

    @property
    def stride(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.do_pad:
            h, w = smart_resize(height, width, 1, self.min_pixels, self.max_pixels, self.max_length)
            return h, w
        return smart_resize(height, width, self.stride, self.min_pixels, self.max_pixels, self.max_length)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One image → normalised float32 [3, h̄, w̄] with h̄, w̄ multiples of 16."""
        image = image.convert("RGB")
        stride = self.stride
        if min(image.width, image.height) < stride and not self.do_pad:
            # The released processor refuses images under one grid cell; upscale them instead.
            scale = stride / min(image.width, image.height)
            size = (max(stride, round(image.width * scale)), max(stride, round(image.height * scale)))
            image = image.resize(size, resample=self.resample)
        height, width = self.target_size(image.height, image.width)
        if (width, height) != image.size:
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image, dtype=np.uint8)
        if self.do_pad:
            padded_h, padded_w = -(-height // stride) * stride, -(-width // stride) * stride
            canvas = np.zeros((padded_h, padded_w, 3), dtype=np.uint8)
            canvas[:height, :width] = pixels
            pixels = canvas
        # Rescale in float64 then cast (as transformers does), normalise in float32.
        scaled = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        normalised = (scaled - mean) / std
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


@dataclass
class ProcessorOutput:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None  # [N_img, 3, S, S] bfloat16, as released
    pixel_values_gen: torch.Tensor | None = None  # [K, 3, Hmax, Wmax] bfloat16
    image_grid_thw_gen: torch.Tensor | None = None  # [K_total, 3] int64
    generation_flags: torch.Tensor | None = None  # [K_total] int64
    rows: list[str] = field(default_factory=list)
    num_prompts: int = 0
    gen_size: tuple[int, int] | None = None  # (H_gen, W_gen)
    images_per_prompt: list[int] = field(default_factory=list)


class InternVLUProcessor:
    def __init__(
        self,
        tokenizer,
        vit_settings: VitImageSettings,
        gen_settings: GenImageSettings,
        image_seq_length: int = 256,
        template: str = "qwen2_5-chat-v3",
    ):
        self.tokenizer = tokenizer
        self.vit_settings = vit_settings
        self.gen_settings = gen_settings
        self.image_seq_length = image_seq_length
        self.template = template
        self.tokenizer.padding_side = "left"
        vocab = tokenizer.get_vocab()
        for token in (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, IMG_UNCOND):
            if token not in vocab:
                raise ModelLoadError(f"the tokenizer has no {token!r} token; is this an InternVL-U processor/ folder?")
        if tokenizer.pad_token_id is None:
            raise ModelLoadError("the tokenizer defines no pad_token (needed for left padding)")

    @classmethod
    def from_folder(cls, folder: Path, template: str = "qwen2_5-chat-v3") -> InternVLUProcessor:
        from transformers import AutoTokenizer

        config_path = folder / "processor_config.json"
        config = read_json(config_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer from {folder}: {exc}") from exc
        gen_class = config.get("image_gen_processor_class", "InternVLUDynamicResGenerationImageProcessor")
        if gen_class != "InternVLUDynamicResGenerationImageProcessor":
            raise ModelLoadError(
                f"{config_path}: image_gen_processor_class {gen_class!r} is not supported "
                "(InternVL-U inference uses InternVLUDynamicResGenerationImageProcessor)"
            )
        return cls(
            tokenizer,
            VitImageSettings.from_dict(config.get("image_processor_kwargs") or {}),
            GenImageSettings.from_dict(config.get("image_gen_processor_kwargs") or {}, str(config_path)),
            image_seq_length=int(config.get("image_seq_length", 256)),
            template=template,
        )

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    def _expand_images(self, text: str) -> str:
        span = IMG_START + IMG_CONTEXT * self.image_seq_length + IMG_END
        return text.replace(IMAGE_SLOT, IMG_CONTEXT).replace(IMG_CONTEXT, span)

    def gen_size(self, height: int, width: int) -> tuple[int, int]:
        # Floored to the 16-px grid like the reference, but never below one grid cell (it crashes there).
        stride = self.gen_settings.stride
        return max(stride, (height // stride) * stride), max(stride, (width // stride) * stride)

    def __call__(
        self,
        prompts: list[str],
        images: list[list[Image.Image]],
        generation_mode: str = "text",
        system_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> ProcessorOutput:
        """Build the batch. ``images[i]`` are the images of prompt ``i`` (possibly empty).

        Generation inputs (VAE images, grids, flags) are built only when ``height`` and ``width`` are
        given: the chain-of-thought stage of ``text_image`` needs just the rows.
        """
        n = len(prompts)
        counts = [len(imgs) for imgs in images]
        user = [normalize_prompt(p, k) for p, k in zip(prompts, counts)]
        for text, k in zip(user, counts):
            slots = text.count(IMAGE_SLOT) + text.count(IMG_CONTEXT)
            if slots != k:
                raise InvalidInputError(
                    f"prompt {text!r} has {slots} image slots ('<image>') but {k} image(s) were given; "
                    "use one '<image>' per image or none at all"
                )
        if generation_mode == "text":
            system = system_prompt if system_prompt is not None else SYSTEM_MESSAGES[self.template]
            rows = [render_conversation(system, u) for u in user]
            row_images = [img for imgs in images for img in imgs]
        else:
            suffix = "-editing" if any(counts) else "-imgen"
            system = system_prompt if system_prompt is not None else SYSTEM_MESSAGES[self.template + suffix]
            text_rows = [
                (IMAGE_SLOT + "\n") * u.count(IMAGE_SLOT) + BLANK_TEXT_WITH_IMAGES if u.count(IMAGE_SLOT) else BLANK_ALL
                for u in user
            ]
            rows = [render_conversation(system, u) for u in user + text_rows + [BLANK_ALL] * n]
            if generation_mode == "image":
                rows = [r + IMG_START for r in rows]
            row_images = [img for imgs in images for img in imgs] * 2
        rows = [self._expand_images(r) for r in rows]
        encoded = self.tokenizer(rows, padding=True, padding_side="left", return_tensors="pt")
        out = ProcessorOutput(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            rows=rows,
            num_prompts=n,
            images_per_prompt=counts,
        )
        if row_images:
            out.pixel_values = self.vit_settings(row_images).to(torch.bfloat16)
        if generation_mode == "text" or height is None or width is None:
            return out

        h_gen, w_gen = self.gen_size(height, width)
        out.gen_size = (h_gen, w_gen)
        patch = self.gen_settings.patch_size
        target_grid = [1, h_gen // patch, w_gen // patch]
        gen_pixels = [self.gen_settings(img) for imgs in images for img in imgs]
        input_grids = [[1, t.shape[1] // patch, t.shape[2] // patch] for t in gen_pixels]
        flags: list[int] = []
        grids: list[list[int]] = []
        for _ in range(2):  # `none` rows, then `text` rows carry the input images
            cursor = 0
            for k in counts:
                for grid in input_grids[cursor : cursor + k]:
                    flags.append(0)
                    grids.append(grid)
                cursor += k
                flags.append(1)
                grids.append(target_grid)
        flags += [1] * n
        grids += [target_grid] * n
        out.generation_flags = torch.tensor(flags, dtype=torch.long)
        out.image_grid_thw_gen = torch.tensor(grids, dtype=torch.long)
        if gen_pixels:
            both = gen_pixels * 2
            h_max = max(t.shape[1] for t in both)
            w_max = max(t.shape[2] for t in both)
            batch = torch.zeros(len(both), 3, h_max, w_max, dtype=torch.float32)
            for i, t in enumerate(both):
                batch[i, :, : t.shape[1], : t.shape[2]] = t
            out.pixel_values_gen = batch.to(torch.bfloat16)
        return out
