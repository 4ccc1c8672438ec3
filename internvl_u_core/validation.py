"""One validation layer for every public entry point (API, CLI, nodes, agent tools).

Each check returns the cleaned value or raises an error that names the argument, the value and
what is allowed.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .errors import GenerationCancelled, InvalidInputError, InvalidInputTypeError
from .limits import DEFAULT_LIMITS, Limits
from .options import ArgumentNames

#: The friendly methods' keywords (``generate(steps=…, num_images=…)``).
API_NAMES = ArgumentNames()
#: The reference-style call's keywords (``pipe(..., num_inference_steps=…)``).
REFERENCE_NAMES = ArgumentNames(steps="num_inference_steps", num_images="num_images_per_prompt")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
GENERATION_MODES = ("text", "image", "text_image")


def device(value, names: ArgumentNames = API_NAMES) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(value, torch.device):
        dev = value
    elif isinstance(value, str):
        try:
            dev = torch.device(value.strip().lower())
        except RuntimeError as exc:
            raise InvalidInputError(
                f"{names.setting('device', value)} is not a device; use cpu, cuda, cuda:0 or mps"
            ) from exc
    else:
        raise InvalidInputTypeError(f"{names.device} must be a string or torch.device, got {type(value).__name__}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"{names.setting('device', value)} is not supported; use cpu, cuda or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            f"{names.setting('device', value)} was asked for but {_no_cuda()}; use {names.setting('device', 'cpu')}"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(
            f"{names.setting('device', value)} was asked for but MPS is not available; "
            f"use {names.setting('device', 'cpu')}"
        )
    return dev


def _no_cuda() -> str:
    """Why torch sees no CUDA GPU, in words."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"


def offload_device(value, option: str, names: ArgumentNames = API_NAMES) -> torch.device:
    """The accelerator ``option`` (CPU offload) moves each component to; None picks CUDA."""
    if value is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        raise InvalidInputError(
            f"{option} keeps the model in CPU memory and moves each part to a GPU while it runs, but "
            f"{_no_cuda()}; run without {option}"
        )
    dev = device(value, names)
    if dev.type == "cpu":
        raise InvalidInputError(
            f"{option} moves each part of the model to a GPU while it runs; with "
            f"{names.setting('device', value)} there is nothing to offload to, so run without {option}"
        )
    return dev


def dtype(value, dev: torch.device) -> torch.dtype:
    if value is None or value == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if dev.type == "mps":
            return torch.float16
        return torch.float32
    if isinstance(value, torch.dtype):
        if value in (torch.float32, torch.bfloat16, torch.float16):
            return value
        raise InvalidInputError(f"torch_dtype {value} is not supported; use float32, bfloat16 or float16")
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
        raise InvalidInputError(
            f"torch_dtype {value!r} is not supported; use 'auto', 'float32', 'bfloat16' or 'float16'"
        )
    raise InvalidInputTypeError(f"torch_dtype must be a string or torch.dtype, got {type(value).__name__}")


def generation_mode(value) -> str:
    if value not in GENERATION_MODES:
        raise InvalidInputError(f"generation_mode {value!r} is not known; use one of {', '.join(GENERATION_MODES)}")
    return value


def text(value, name: str, limits: Limits = DEFAULT_LIMITS) -> str:
    if not isinstance(value, str):
        raise InvalidInputTypeError(f"{name} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInputError(f"{name} contains a NUL character; remove it")
    if len(value) > limits.max_prompt_chars:
        raise InvalidInputError(
            f"{name} has {len(value):,} characters, more than the {limits.max_prompt_chars:,} allowed; shorten it"
        )
    return value


def optional_text(value, name: str, limits: Limits = DEFAULT_LIMITS) -> str | None:
    return None if value is None else text(value, name, limits)


def system_prompt(value, limits: Limits = DEFAULT_LIMITS, name: str = "system_prompt") -> str | None:
    value = optional_text(value, name, limits)
    if value is not None and ("<image>" in value or "<IMG_CONTEXT>" in value):
        raise InvalidInputError(f"{name} must not contain image slots ('<image>'); put them in the prompt")
    return value


def load_image(value, name: str, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """A PIL image (any mode), a path or encoded bytes → an RGB PIL image; huge images are downscaled, absurd files refused."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if path.is_dir():
            raise InvalidInputError(f"{name}: {os.fspath(value)!r} is a folder, not an image file")
        if not path.is_file():
            raise InvalidInputError(f"{name}: image file {os.fspath(value)!r} does not exist")
        image = _open_encoded(path, repr(os.fspath(value)), name, limits)
    elif isinstance(value, (bytes, bytearray)):
        image = _open_encoded(io.BytesIO(value), f"the {len(value):,}-byte image", name, limits)
    elif isinstance(value, torch.Tensor) or type(value).__name__ == "ndarray":
        raise InvalidInputTypeError(
            f"{name} must be a PIL image or a file path, got a {type(value).__name__}; convert it with "
            "PIL.Image.fromarray(array_uint8_hwc)"
        )
    else:
        raise InvalidInputTypeError(f"{name} must be a PIL image, a file path or bytes, got {type(value).__name__}")
    if image.width < 1 or image.height < 1:
        raise InvalidInputError(f"{name}: image has no pixels ({image.width}×{image.height})")
    original_size = image.size
    image = to_rgb(image, name)
    if image.width * image.height > limits.max_input_pixels:
        scale = math.sqrt(limits.max_input_pixels / (image.width * image.height))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    if image.size != original_size:  # downscaled here or by JPEG draft decoding: say from what
        image.info["original_size"] = original_size
    return image


def _open_encoded(source, label: str, name: str, limits: Limits) -> Image.Image:
    """Open an image file lazily (header only) and refuse or draft-downscale it before any pixel is decoded."""
    try:
        with warnings.catch_warnings():  # our own bound (max_input_file_pixels, below) decides, not PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise InvalidInputError(f"{name}: {label} is too large to open safely ({exc}); downscale it first") from exc
    except UnidentifiedImageError:  # Pillow's text names an in-memory object, not the file
        raise InvalidInputError(
            f"{name}: cannot read {label}: it is not an image file Pillow can read (PNG, JPEG, WebP, BMP, TIFF, GIF …)"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"{name}: cannot read {label} as an image ({exc})") from exc
    if image.width * image.height > limits.max_input_file_pixels:
        raise InvalidInputError(
            f"{name}: {label} is {image.width}×{image.height} pixels, more than the "
            f"{limits.max_input_file_pixels:,} allowed; downscale it first"
        )
    if image.width * image.height > limits.max_input_pixels:
        # JPEG can decode at 1/2, 1/4, 1/8 scale: never allocate the full image.
        scale = math.sqrt(limits.max_input_pixels / (image.width * image.height))
        image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    return image


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode to RGB (alpha composited on white, 16-bit scaled to 8-bit)."""
    try:
        if image.mode == "RGB":
            image.load()
            return image
        if image.mode.startswith("I;16"):
            return Image.fromarray(_sixteen_to_eight_bits(image), mode="L").convert("RGB")
        if image.mode == "I":
            import numpy as np

            array = np.asarray(image, dtype=np.float64)
            peak = max(float(array.max()), 1.0)
            array = np.clip(array / peak * 255.0, 0, 255).round().astype(np.uint8)
            return Image.fromarray(array, mode="L").convert("RGB")
        if image.mode == "F":
            import numpy as np

            array = np.nan_to_num(np.asarray(image, dtype=np.float64))
            lo, hi = float(array.min()), float(array.max())
            array = ((array - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
            return Image.fromarray(array, mode="L").convert("RGB")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInputError(f"{name}: cannot decode the image ({exc})") from exc


def _sixteen_to_eight_bits(image: Image.Image):
    """``round(v / 65535 · 255)`` per pixel, in bands of rows: integer arithmetic, a few MB of scratch at most.

    ``v · 255 / 65535 = v / 257`` is never exactly halfway between two integers, so adding half the
    divisor before the integer division rounds as ``numpy.round`` did on the float64 copy it replaces
    (which cost 8 bytes per pixel, plus temporaries).
    """
    import numpy as np

    source = np.asarray(image)  # uint16 (or its byte-swapped twin), 2 bytes per pixel
    out = np.empty(source.shape, dtype=np.uint8)
    band = max(1, (1 << 20) // max(source.shape[1], 1))
    for top in range(0, source.shape[0], band):
        rows = source[top : top + band].astype(np.uint32)
        out[top : top + band] = (rows * 255 + 32767) // 65535
    return out


def image_header(data: bytes, name: str, limits: Limits = DEFAULT_LIMITS,
                 formats: tuple[str, ...] | None = None) -> Image.Image:
    """Encoded bytes from an untrusted client, opened lazily: refused from the header alone (no pixel decoded)
    when the format is not in ``formats`` or the image has more than ``limits.max_input_pixels`` pixels.

    Unlike :func:`load_image` (which downscales a large local file), nothing above the limit is decoded
    at all, so a tiny file that claims a huge image costs no memory. Decode the result with :func:`to_rgb`.
    """
    label = f"the {len(data):,}-byte upload"
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:
        image = None
    except (OSError, SyntaxError, ValueError) as exc:
        kinds = ", ".join(formats) if formats else "PNG, JPEG, WebP, GIF, BMP, …"
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidInputError(f"{name}: cannot read {label}: it is not an image file of a known kind ({kinds})") from None
        raise InvalidInputError(f"{name}: {label} has a damaged image header; send a valid image file") from None
    if image is None or image.width * image.height > limits.max_input_pixels:
        size = "" if image is None else f" is {image.width}×{image.height} pixels,"
        raise InvalidInputError(
            f"{name}: {label}{size} more than the {limits.max_input_pixels:,} pixels allowed; downscale it first"
        )
    if image.width < 1 or image.height < 1:
        raise InvalidInputError(f"{name}: image has no pixels ({image.width}×{image.height})")
    return image


def image_list(value, name: str, *, allow_empty: bool, limits: Limits = DEFAULT_LIMITS) -> list[Image.Image]:
    if value is None:
        items = []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items and not allow_empty:
        raise InvalidInputError(f"{name}: at least one image is needed")
    if len(items) > limits.max_images_per_prompt:
        raise InvalidInputError(
            f"{name}: {len(items)} images given, at most {limits.max_images_per_prompt} are allowed"
        )
    return [load_image(item, f"{name}[{i}]" if len(items) > 1 else name, limits) for i, item in enumerate(items)]


def image_each(value, name: str, limits: Limits = DEFAULT_LIMITS) -> list[Image.Image]:
    """One image or a list of them, each a job of its own (``understand_each``): no per-prompt cap, at least one."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise InvalidInputError(f"{name}: at least one image is needed")
    return [load_image(item, f"{name}[{i}]", limits) for i, item in enumerate(items)]


def prompts_and_images(
    prompt, image, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[list[str], list[list[Image.Image]]]:
    """Reference nesting → one prompt list and one image list per prompt."""
    if isinstance(prompt, str):
        prompts = [text(prompt, "prompt", limits)]
    elif isinstance(prompt, (list, tuple)) and prompt:
        prompts = [text(p, f"prompt[{i}]", limits) for i, p in enumerate(prompt)]
    else:
        raise InvalidInputTypeError("prompt must be a string or a non-empty list of strings")
    n = len(prompts)
    if image is None:
        per_prompt = [[] for _ in prompts]
    elif isinstance(image, (list, tuple)):
        entries = list(image)
        nested = any(isinstance(e, (list, tuple)) or e is None for e in entries)
        if n == 1 and not nested and len(entries) != 1:
            entries = [entries]  # several images for the one prompt
        if len(entries) != n:
            raise InvalidInputError(
                f"image has {len(entries)} entries but there are {n} prompts; give one entry per prompt "
                "(an entry may be a list of images, or None)"
            )
        per_prompt = [image_list(e, f"image[{i}]", allow_empty=True, limits=limits) for i, e in enumerate(entries)]
    else:
        if n != 1:
            raise InvalidInputError(f"one image was given for {n} prompts; give a list with one entry per prompt")
        per_prompt = [image_list(image, "image", allow_empty=False, limits=limits)]
    return prompts, per_prompt


def shown(value, limit: int = 60) -> str:
    """``value`` as an error message quotes it: a huge integer by its length, anything else cut to ``limit`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def integer(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidInputTypeError(f"{name} must be an integer, got {shown(value)}")
    if not low <= value <= high:
        raise InvalidInputError(f"{name} = {shown(value)} is out of range; allowed {low}…{high}")
    return int(value)


def finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, torch.Tensor) and value.numel() == 1
    ):
        raise InvalidInputTypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidInputError(f"{name} = {shown(value)} must be a finite number") from None
    if not math.isfinite(number):
        raise InvalidInputError(f"{name} = {shown(value)} must be a finite number")
    return number


def positive(value, name: str) -> float:
    number = finite(value, name)
    if number <= 0:
        raise InvalidInputError(f"{name} = {shown(value)} must be > 0")
    return number


def in_range(value, name: str, low: float, high: float) -> float:
    """A finite number in ``[low, high]``."""
    number = finite(value, name)
    if not low <= number <= high:
        raise InvalidInputError(f"{name} = {shown(value)} is out of range; allowed {low:g}…{high:g}")
    return number


def flow_shift(value, limits: Limits = DEFAULT_LIMITS, name: str = "flow_shift") -> float:
    """The scheduler's time shift; beyond ``limits.max_flow_shift`` every timestep rounds to 1000."""
    return in_range(value, name, limits.min_flow_shift, limits.max_flow_shift)


def timestep_trunc(value, limits: Limits = DEFAULT_LIMITS, name: str = "timestep_trunc") -> float:
    """Guidance is renormalised at timesteps above this (timesteps run 1000 … 0; ``<= 0``: at every step)."""
    return in_range(value, name, -limits.max_timestep_trunc, limits.max_timestep_trunc)


def token_ids(value, name: str, vocabulary: int | None = None) -> tuple[int, ...]:
    """Token ids as a tuple of ints, each in ``0 … vocabulary - 1`` (any int without a ``vocabulary``)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidInputTypeError(f"{name} must be a list of integer token ids")
    if vocabulary is None:
        return tuple(value)
    bad = [t for t in value if not 0 <= t < vocabulary]
    if bad:
        raise InvalidInputError(f"{name} holds ids outside the model's vocabulary 0…{vocabulary - 1}, e.g. {bad[0]}")
    return tuple(value)


def steps(value, limits: Limits = DEFAULT_LIMITS, name: str = "steps") -> int:
    return integer(value, name, 1, limits.max_steps)


def num_images(value, limits: Limits = DEFAULT_LIMITS, name: str = "num_images") -> int:
    return integer(value, name, 1, limits.max_output_images)


def guidance_scale(value, name: str, limits: Limits = DEFAULT_LIMITS) -> float:
    scale = finite(value, name)
    if not 0 <= scale <= limits.max_guidance_scale:
        raise InvalidInputError(f"{name} = {shown(value)} is out of range; allowed 0…{limits.max_guidance_scale:g}")
    return scale


def image_size(height, width, limits: Limits = DEFAULT_LIMITS, names: ArgumentNames = API_NAMES) -> tuple[int, int]:
    height = integer(height, names.height, limits.min_side, limits.max_side)
    width = integer(width, names.width, limits.min_side, limits.max_side)
    if height * width > limits.max_pixels:
        raise InvalidInputError(
            f"{names.height}×{names.width} = {height}×{width} exceeds the {limits.max_pixels:,}-pixel budget "
            "(limits.max_pixels)"
        )
    return height, width


def fitted_size(width: int, height: int, limits: Limits = DEFAULT_LIMITS) -> tuple[int, int]:
    """``(width, height)`` scaled down, keeping the aspect ratio, to the largest size a drawing may have.

    An input image's size is the default output size of an edit; a photo larger than the limits
    (``max_side``, ``max_pixels``) is drawn at this size instead of being refused under a size the
    caller never gave. Sizes within the limits come back unchanged (small ones raised to ``min_side``).
    """
    scale = min(1.0, limits.max_side / width, limits.max_side / height, math.sqrt(limits.max_pixels / (width * height)))
    fitted = (max(limits.min_side, math.floor(width * scale)), max(limits.min_side, math.floor(height * scale)))
    return (min(fitted[0], limits.max_side), min(fitted[1], limits.max_side))


def requested_size(
    height, width, default: tuple[int, int] | None, limits: Limits = DEFAULT_LIMITS, names: ArgumentNames = API_NAMES
) -> tuple[int, int] | None:
    """``(height, width)``: a single given side is used for both (as the reference does); neither → ``default``."""
    if height is None and width is None:
        if default is None:
            return None
        height, width = default
    # Check a single given side under its own name before it stands in for the other.
    if height is None:
        height = width = integer(width, names.width, limits.min_side, limits.max_side)
    if width is None:
        width = height = integer(height, names.height, limits.min_side, limits.max_side)
    return image_size(height, width, limits, names)


def optional_seed(value, limits: Limits = DEFAULT_LIMITS, name: str = "seed") -> int | None:
    return None if value is None else integer(value, name, 0, limits.max_seed)


def seed_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator for an already validated seed (``None``: torch's global random state)."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(seed if seed < 2**63 else seed - 2**64)


def generator(value):
    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(g, torch.Generator) for g in value):
        return list(value)
    raise InvalidInputTypeError(f"generator must be a torch.Generator, got {type(value).__name__}")


def text_kwargs(
    kwargs: dict, default_max_new_tokens: int | None, limits: Limits = DEFAULT_LIMITS, names: ArgumentNames = API_NAMES
) -> dict:
    out = dict(kwargs)
    if "max_new_tokens" not in out and default_max_new_tokens is not None:
        out["max_new_tokens"] = default_max_new_tokens
    if "max_new_tokens" in out:
        out["max_new_tokens"] = integer(out["max_new_tokens"], names.max_new_tokens, 1, limits.max_new_tokens)
    if "min_new_tokens" in out:
        out["min_new_tokens"] = integer(out["min_new_tokens"], names.min_new_tokens, 0, limits.max_new_tokens)
        if out["min_new_tokens"] > out.get("max_new_tokens", out["min_new_tokens"]):
            raise InvalidInputError(
                f"{names.min_new_tokens} = {out['min_new_tokens']} is larger than "
                f"{names.max_new_tokens} = {out['max_new_tokens']}"
            )
    for flag in ("return_dict_in_generate", "output_hidden_states"):
        out.pop(flag, None)  # the output object is fixed; accepted for compatibility
    if "num_beams" in out:
        out["num_beams"] = integer(out["num_beams"], names.num_beams, 1, limits.max_num_beams)
    if "do_sample" in out and not isinstance(out["do_sample"], bool):
        raise InvalidInputTypeError(f"{names.do_sample} must be True or False, got {out['do_sample']!r}")
    if "temperature" in out:
        t = finite(out["temperature"], names.temperature)
        if t <= 0:
            raise InvalidInputError(f"{names.temperature} = {t} must be > 0")
        out["temperature"] = t
    if "top_p" in out:
        p = finite(out["top_p"], names.top_p)
        if not 0 < p <= 1:
            raise InvalidInputError(f"{names.top_p} = {p} must be in (0, 1]")
        out["top_p"] = p
    return out


def prompt_length(tokens: int, new_tokens: int, limit: int, name: str) -> None:
    if tokens + new_tokens > limit:
        raise InvalidInputError(
            f"{name} is {tokens} tokens long (plus {new_tokens} new tokens), more than the model's context of "
            f"{limit} tokens; shorten it"
        )


def run_text_callback(callback: Callable, text: str) -> None:
    if callback(text) is False:
        raise GenerationCancelled("text generation was stopped by the text callback")


def latents(value, channels: int) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` (a single-frame ``[N, C, 1, h, w]`` video latent is accepted), float32."""
    if not isinstance(value, torch.Tensor):
        raise InvalidInputTypeError(f"latents must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim == 5 and value.shape[2] == 1:
        value = value[:, :, 0]
    if value.ndim != 4 or value.shape[1] != channels or value.shape[0] == 0:
        raise InvalidInputError(
            f"latents of shape {tuple(value.shape)} do not fit this model; expected [N, {channels}, H/8, W/8] "
            f"(or [N, {channels}, 1, H/8, W/8])"
        )
    if not torch.isfinite(value).all():
        raise InvalidInputError("latents contain NaN or infinite values")
    return value.to(torch.float32)


def run_callback(callback: Callable | None, step: int, total: int, latents: torch.Tensor) -> None:
    if callback is not None and callback(step, total, latents) is False:
        raise GenerationCancelled(f"generation was stopped by the callback at step {step} of {total}")
