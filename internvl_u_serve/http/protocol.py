"""vLLM-Omni's InternVL-U dialect of the OpenAI API: request fields → jobs, results → responses.

Every problem with a request becomes an :class:`APIError` that names the field (OpenAI's
``{"error": {"message", "type", "param", "code"}}``). Numbers and texts are checked with the
core's own validation, so messages read the same as in-process errors.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from internvl_u_core import InternVLUError, Reasoning, random_seed
from internvl_u_core import validation as check
from internvl_u_core.draw_request import DrawRequest
from internvl_u_core.files import ACCEPTED_FORMATS, png_bytes, png_data_uri
from internvl_u_core.limits import DEFAULT_ANSWER_TOKENS, DEFAULT_REASONING_TOKENS, DEFAULT_STEPS
from internvl_u_core.validation import shown

from .engine import STREAM_BUFFER_BYTES, DrawResult, DrawWork, TextResult, TextWork


class APIError(Exception):
    """An HTTP error in OpenAI's shape; ``param`` names the request field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        if self.status == 429:
            kind = "rate_limit_error"
        else:
            kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@contextlib.contextmanager
def field_named(name: str):
    """Turn the core's validation errors into a 400 naming ``name``."""
    try:
        yield
    except (ValueError, TypeError, InternVLUError) as exc:
        raise bad_request(name, str(exc)) from exc


@dataclass
class ServerSettings:
    """What the command line decides for every request."""

    model_name: str
    limits: check.Limits = field(default_factory=check.Limits)
    think: bool = False  # the default of the per-request ``think`` field for image requests
    allowed_image_hosts: frozenset[str] = frozenset()
    max_image_bytes: int = 64 * 1024 * 1024
    stream_buffer_bytes: int = STREAM_BUFFER_BYTES  # see engine.STREAM_BUFFER_BYTES
    lora_dirs: tuple[Path, ...] = ()  # folders whose .safetensors adapters a request's ``lora`` may name


#: Longest number literal read from a request (a seed of 2**64 has 20 digits); longer ones are refused
#: before Python converts them (a 5,000-digit integer costs time and exceeds Python's own digit limit).
MAX_NUMBER_CHARS = 100
#: Deepest nesting of arrays and objects in a request body (a chat request needs 5).
MAX_JSON_DEPTH = 64


class _OverlongNumber:
    """Stands in for a number literal over :data:`MAX_NUMBER_CHARS` until its field is found."""

    def __init__(self, text: str):
        self.length = len(text)


def parse_json(body: bytes):
    """A request body → its JSON value, or a 400 naming the field whose number is too long or nesting too deep.

    Run it off the event loop: a large body takes a while.
    """
    overlong = False

    def number(kind):
        def parse(text: str):
            nonlocal overlong
            if len(text) > MAX_NUMBER_CHARS:
                overlong = True
                return _OverlongNumber(text)
            return kind(text)

        return parse

    try:
        value = json.loads(body, parse_int=number(int), parse_float=number(float))
    except RecursionError:
        value = None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(None, f"the request body is not valid JSON ({exc})") from None
    except ValueError as exc:  # e.g. a lone surrogate the decoder refuses
        raise bad_request(None, "the request body is not valid JSON") from exc
    # Python's parser gives up (RecursionError) near 1,000 levels; below that the parsed value is walked.
    depth, field_ = _deepest(body) if value is None else _depth_of(value)
    if depth > MAX_JSON_DEPTH:
        raise bad_request(field_, f"{field_ or 'the request body'}: arrays and objects nest more than "
                                  f"{MAX_JSON_DEPTH} levels deep; at most {MAX_JSON_DEPTH} are read")
    if overlong:
        path = _find(value, lambda item: isinstance(item, _OverlongNumber))
        top = path.split(".")[0].split("[")[0] or None
        raise bad_request(top, f"{path or 'the request body'}: a number literal longer than {MAX_NUMBER_CHARS} "
                               "characters; send a shorter number")
    return value


_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:]')


def _deepest(body: bytes) -> tuple[int, str | None]:
    """How deep the body nests (scanned, not parsed; the scan stops once past :data:`MAX_JSON_DEPTH`), and
    the top-level key under which it nests deepest."""
    depth = deepest = 0
    key = pending = field_ = None
    for match in _JSON_TOKEN.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest, field_ = depth, key if depth > 1 else None
            if depth > MAX_JSON_DEPTH:
                break
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b":":
            if depth == 1:
                key = pending
        elif depth == 1:
            pending = token[1:-1].decode("utf-8", "replace")[:100]
    return deepest, field_


def _depth_of(value) -> tuple[int, str | None]:
    """How deep a parsed value nests, and the top-level key under which it nests deepest."""
    deepest, field_ = 0, None
    stack = [(value, 1, None)]
    while stack:
        item, depth, top = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > deepest:
                deepest, field_ = depth, top
            children = item.items() if isinstance(item, dict) else ((top, v) for v in item)
            stack.extend((v, depth + 1, k if depth == 1 and isinstance(item, dict) else top) for k, v in children)
    return deepest, field_


def _find(value, wanted) -> str:
    """The path (``a.b[2]``) of the first item in ``value`` that ``wanted`` accepts, walked without recursion."""
    stack = [("", value)]
    while stack:
        path, item = stack.pop()
        if wanted(item):
            return path
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
    return ""


class Fields:
    """Typed, validated access to a request's top-level fields (JSON values or multipart strings)."""

    def __init__(self, data: Mapping, *, form: bool = False):
        self.data = data
        self.form = form

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str):
        return self.data.get(name)

    def string(self, name: str, *, required: bool = False, limits: check.Limits | None = None) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise bad_request(name, f"{name} is required")
            return None
        with field_named(name):
            return check.text(value, name, limits or check.DEFAULT_LIMITS)

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if self.form:
            value = _parse_number(name, value, int)
        with field_named(name):
            return check.integer(value, name, low, high)

    def number(self, name: str, default: float | None = None, *, low: float | None = None,
               high: float | None = None, positive: bool = False) -> float | None:
        value = self.data.get(name)
        if value is None:
            return default
        if self.form:
            value = _parse_number(name, value, float)
        with field_named(name):
            number = check.positive(value, name) if positive else check.finite(value, name)
        if (low is not None and number < low) or (high is not None and number > high):
            raise bad_request(name, f"{name} = {number} is out of range; allowed {low}…{high}")
        return number

    def checked(self, name: str, check_value) -> float | None:
        """A number checked by the core's ``check_value(value)`` (which names its range), or ``None`` if absent."""
        value = self.data.get(name)
        if value is None:
            return None
        if self.form:
            value = _parse_number(name, value, float)
        with field_named(name):
            return check_value(value)

    def boolean(self, name: str, default: bool | None = None) -> bool | None:
        value = self.data.get(name)
        if value is None:
            return default
        if self.form and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise bad_request(name, f"{name} must be true or false, got {shown(value)}")
        return value

    def json_object(self, name: str) -> dict | None:
        value = self.data.get(name)
        if value is None:
            return None
        if self.form and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise bad_request(name, f"{name} must be a JSON object ({exc})") from exc
        if not isinstance(value, dict):
            raise bad_request(name, f"{name} must be an object, got {type(value).__name__}")
        return value


def _parse_number(name: str, value, kind):
    if not isinstance(value, str):
        return value
    if len(value) > MAX_NUMBER_CHARS:
        raise bad_request(name, f"{name}: a number of {len(value):,} characters; at most {MAX_NUMBER_CHARS} are read")
    try:
        return kind(value.strip())
    except ValueError:
        try:
            number = float(value.strip())
        except ValueError:
            raise bad_request(name, f"{name} must be a number, got {shown(value)}") from None
        return number


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
def check_model(fields: Fields, settings: ServerSettings) -> None:
    model = fields.raw("model")
    if model is not None and model != settings.model_name:
        raise APIError(404, f"The model {shown(model)} does not exist; this server serves `{settings.model_name}`.",
                       param="model", code="model_not_found")


def parse_reasoning(fields: Fields) -> Reasoning | None:
    """The ``reasoning`` extension field: a chain-of-thought from an earlier ``reason`` to draw from."""
    data = fields.json_object("reasoning")
    if data is None:
        return None
    with field_named("reasoning"):
        return Reasoning.from_dict(data)


def draw_settings(fields: Fields, settings: ServerSettings, width: int | None, height: int | None) -> dict:
    """The diffusion settings of :class:`DrawRequest`, each checked against the core's documented range."""
    limits = settings.limits
    return {
        "width": width,
        "height": height,
        "steps": fields.integer("num_inference_steps", 1, limits.max_steps, default=DEFAULT_STEPS),
        "all_cfg_scale": fields.checked("all_cfg_scale", lambda v: check.guidance_scale(v, "all_cfg_scale", limits)),
        "part_cfg_scale": fields.checked("part_cfg_scale",
                                         lambda v: check.guidance_scale(v, "part_cfg_scale", limits)),
        "timestep_trunc": fields.checked("timestep_trunc", lambda v: check.timestep_trunc(v, limits)),
        "flow_shift": fields.checked("flow_shift", lambda v: check.flow_shift(v, limits)),
    }


def seed_of(fields: Fields, limits: check.Limits) -> int:
    """The request's seed, or a fresh random one (every draw job carries its own seed)."""
    seed = fields.integer("seed", 0, limits.max_seed)
    return random_seed() if seed is None else seed


def think_settings(fields: Fields, settings: ServerSettings, reasoning: Reasoning | None) -> dict | None:
    """Chain-of-thought settings when the request draws in think mode, else ``None``."""
    think = fields.boolean("think", default=None)
    if think and reasoning is not None:
        raise bad_request("think", "think: give either think=true (reason now) or a reasoning (reasoned before)")
    if reasoning is not None or not (settings.think if think is None else think):
        return None
    return {"max_new_tokens": fields.integer("max_tokens", 1, settings.limits.max_new_tokens,
                                             default=DEFAULT_REASONING_TOKENS)}


def size_of(fields: Fields, settings: ServerSettings) -> tuple[int | None, int | None]:
    """``size`` "WxH" (or "auto"), or the ``width``/``height`` extension fields."""
    size = fields.raw("size")
    width = fields.integer("width", settings.limits.min_side, settings.limits.max_side)
    height = fields.integer("height", settings.limits.min_side, settings.limits.max_side)
    if size is None or size == "auto":
        return width, height
    if width is not None or height is not None:
        raise bad_request("size", "size: give size or width/height, not both")
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(size))
    if not match:
        raise bad_request("size", f"size must look like '1024x1024' (width x height), got {shown(size)}")
    width, height = int(match.group(1)), int(match.group(2))
    with field_named("size"):
        check.image_size(height, width, settings.limits)
    return width, height


# vLLM-Omni request fields that other models use but InternVL-U cannot honour: refused (400), so that
# nobody believes they took effect. Fields without any effect on results (``user``, ``background``
# other than transparent, ``vae_use_slicing``/``vae_use_tiling``) are accepted and ignored.
UNSUPPORTED_FIELDS = {
    "negative_prompt": "InternVL-U has no negative prompt (its guidance drops the condition instead)",
    "guidance_scale": "InternVL-U's guidance is set with all_cfg_scale and part_cfg_scale",
    "true_cfg_scale": "InternVL-U's guidance is set with all_cfg_scale and part_cfg_scale",
    "strength": "InternVL-U edits from the input image's latents, without a noise strength",
    "mask": "InternVL-U edits whole images; masks are not supported",
    "mask_image": "InternVL-U edits whole images; masks are not supported",
    "reference_image": "send every input image as an 'image' file (or content part)",
    "layers": "layered output is another model's feature",
    "resolution": "give the output size with size (or width and height)",
    "bot_task": "InternVL-U reasons before drawing with think=true",
    "sys_type": "set the system message with system_prompt",
    "use_system_prompt": "set the system message with system_prompt",
    "infer_align_image_size": "give the output size with size (or width and height)",
}
EXTRA_BODY = ("all_cfg_scale", "part_cfg_scale", "timestep_trunc", "flow_shift")  # InternVL-U's declared extras
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def refuse_unsupported(fields: Fields) -> None:
    for name, hint in UNSUPPORTED_FIELDS.items():
        if fields.has(name):
            raise bad_request(name, f"{name} is not supported: {hint}")
    if fields.raw("response_format") not in (None, "b64_json"):
        raise bad_request("response_format", "response_format: only 'b64_json' is supported (this server stores no files)")
    if fields.raw("generator_device") not in (None, "cpu"):
        raise bad_request("generator_device", "generator_device: the noise always comes from a CPU generator seeded "
                                              "with seed, so that results equal the in-process pipeline's")
    if fields.raw("background") == "transparent":
        raise bad_request("background", "background: InternVL-U draws opaque RGB images")


def merge_extra_params(fields: Fields) -> Fields:
    """vLLM-Omni's ``extra_params`` object may carry InternVL-U's extra-body fields instead of the top level."""
    extra = fields.json_object("extra_params")
    if not extra:
        return fields
    unknown = sorted(set(extra) - set(EXTRA_BODY))
    if unknown:
        raise bad_request("extra_params", f"extra_params: InternVL-U takes only {', '.join(EXTRA_BODY)}; "
                                          f"got {', '.join(unknown)}")
    twice = [name for name in extra if fields.has(name)]
    if twice:
        raise bad_request("extra_params", f"extra_params: {twice[0]} is also given at the top level; give it once")
    return Fields({**fields.data, **extra}, form=fields.form)


def output_format(fields: Fields) -> tuple[str, int]:
    """``output_format`` (png: the exact pixels; jpeg/webp lossy) and ``output_compression`` (quality 0-100)."""
    fmt = fields.raw("output_format") or "png"
    if not isinstance(fmt, str) or fmt not in OUTPUT_FORMATS:
        raise bad_request("output_format", f"output_format must be one of png, jpeg, webp; got {shown(fmt)}")
    return fmt, fields.integer("output_compression", 0, 100, default=100)


def encode(image: Image.Image, fmt: str = "png", quality: int = 100) -> bytes:
    if fmt == "png":
        return png_bytes(image)
    buffer = io.BytesIO()
    image.save(buffer, format=OUTPUT_FORMATS[fmt], quality=quality)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def decode_data_uri(url: str, name: str) -> bytes:
    """``data:image/…;base64,…`` → bytes."""
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        raise bad_request(name, f"{name}: expected a data:image/...;base64,... URI")
    media = header[5:-7]
    if media and not media.startswith("image/"):
        raise bad_request(name, f"{name}: the data URI holds {shown(media)}, not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(name, f"{name}: the base64 payload is invalid ({exc})") from exc


#: Image formats the server decodes (the MCP server's list); anything else is refused from its header.
IMAGE_FORMATS = ACCEPTED_FORMATS


def image_header(data: bytes, name: str, limits: check.Limits) -> Image.Image:
    """Encoded bytes → a lazily opened image, refused from its header alone (format, pixel count)."""
    with field_named(name):
        return check.image_header(data, name, limits, IMAGE_FORMATS)


def decode_image(image: Image.Image, name: str) -> Image.Image:
    """A header-checked image → RGB pixels (the work the server bounds with its decode pool)."""
    with field_named(name):
        try:
            return check.to_rgb(image, name)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise bad_request(name, f"{name}: the image data is damaged or truncated; send a valid image file") from exc
        except Image.DecompressionBombError as exc:
            raise bad_request(name, f"{name}: the image expands beyond the pixel limit; send a smaller image") from exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------------------------
# Chat completions
# ----------------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    work: TextWork | DrawWork
    image_urls: list[tuple[str, str]]  # (field name, url) still to be turned into images
    stream: bool
    n: int


def parse_chat(body, settings: ServerSettings) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    fields = merge_extra_params(Fields(body))
    check_model(fields, settings)
    limits = settings.limits
    system_prompt, text, image_urls = _parse_messages(body.get("messages"), limits)
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not modalities or not all(m in ("text", "image") for m in modalities):
        raise bad_request("modalities", f"modalities must be ['text'] or ['image'], got {shown(modalities)}")
    stream = bool(fields.boolean("stream", default=False))
    n = fields.integer("n", 1, limits.max_output_images, default=1)
    if "image" in modalities:
        if stream:
            raise bad_request("stream", "stream: streaming is available for text answers only")
        reasoning = parse_reasoning(fields)
        settings_ = draw_settings(fields, settings, fields.integer("width", limits.min_side, limits.max_side),
                                  fields.integer("height", limits.min_side, limits.max_side))
        request = DrawRequest(prompt=text, seed=seed_of(fields, limits), num_images=n, system_prompt=system_prompt,
                              reasoning=reasoning, **settings_)
        work = DrawWork(request, think=think_settings(fields, settings, reasoning))
        return ChatRequest(work, image_urls, stream=False, n=n)
    if n != 1:
        raise bad_request("n", "n: text answers come one at a time (n = 1)")
    reason = bool(fields.boolean("think", default=False))
    max_tokens = fields.integer("max_completion_tokens", 1, limits.max_new_tokens)
    max_tokens = fields.integer("max_tokens", 1, limits.max_new_tokens, default=max_tokens)
    sampling = {"max_new_tokens": max_tokens if max_tokens is not None else (DEFAULT_REASONING_TOKENS if reason else DEFAULT_ANSWER_TOKENS)}
    sampling.update(_sampling(fields, limits))
    work = TextWork(task="reason" if reason else "understand", prompt=text, images=[],
                    system_prompt=system_prompt, sampling=sampling, stream=stream)
    return ChatRequest(work, image_urls, stream=stream, n=1)


def _sampling(fields: Fields, limits: check.Limits) -> dict:
    """OpenAI's sampling fields → the core's: ``temperature: 0`` (or none given) decodes greedily."""
    temperature = fields.number("temperature", low=0.0, high=100.0)
    top_p = fields.number("top_p", low=0.0, high=1.0)
    if top_p == 0:
        raise bad_request("top_p", "top_p = 0 keeps no token; use a value in (0, 1]")
    do_sample = fields.boolean("do_sample")
    if do_sample is None:
        do_sample = bool(temperature) or (top_p is not None and top_p < 1)
    out = {"do_sample": do_sample, "seed": fields.integer("seed", 0, limits.max_seed)}
    if temperature:
        out["temperature"] = temperature
    if top_p is not None:
        out["top_p"] = top_p
    out["min_new_tokens"] = fields.integer("min_tokens", 0, limits.max_new_tokens, default=0)
    out["num_beams"] = fields.integer("num_beams", 1, limits.max_num_beams, default=1)
    return out


def _parse_messages(messages, limits: check.Limits) -> tuple[str | None, str, list[tuple[str, str]]]:
    """One optional system message, then one user message → (system prompt, text, image URLs)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "messages must be a non-empty list")
    system_prompt = None
    user = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request("messages", f"messages[{i}] must be an object")
        role = message.get("role")
        if role in ("system", "developer") and i == 0 and len(messages) > 1:
            system_prompt = _system_text(message.get("content"), f"messages[{i}].content", limits)
        elif role == "user" and i == len(messages) - 1:
            user = message
        else:
            raise bad_request(
                "messages",
                f"messages[{i}]: this server answers one user message, optionally after one system message "
                f"(got role {shown(role)} there); multi-turn conversations are not supported",
            )
    if user is None:
        raise bad_request("messages", "messages: the last message must be the user's")
    return (system_prompt, *_user_content(user.get("content"), f"messages[{len(messages) - 1}].content", limits))


def _system_text(content, name: str, limits: check.Limits) -> str:
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise bad_request("messages", f"{name}: a system message holds text parts only")
        content = "\n".join(str(p.get("text", "")) for p in content)
    with field_named("messages"):
        return check.system_prompt(check.text(content, name, limits), limits)


def _user_content(content, name: str, limits: check.Limits) -> tuple[str, list[tuple[str, str]]]:
    """Text parts joined by newlines, each image part an ``<image>`` slot in place (as the core's prompts)."""
    if isinstance(content, str):
        return _checked_text(content, name, limits), []
    if not isinstance(content, list) or not content:
        raise bad_request("messages", f"{name} must be a string or a non-empty list of content parts")
    pieces: list[str] = []
    urls: list[tuple[str, str]] = []
    for j, part in enumerate(content):
        where = f"{name}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request("messages", f"{where}.text must be a string")
            pieces.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise bad_request("messages", f"{where}.image_url.url must be a string")
            urls.append((f"{where}.image_url", url))
            pieces.append("<image>")
        else:
            raise bad_request("messages", f"{where}: content parts must be 'text' or 'image_url', got {shown(kind)}")
    if len(urls) > limits.max_images_per_prompt:
        raise bad_request("messages", f"{name}: {len(urls)} images, at most {limits.max_images_per_prompt} are allowed")
    if urls and all(p == "<image>" for p in pieces[: len(urls)]):
        # Images before all text: the core adds the same leading slots itself.
        pieces = pieces[len(urls):] or [""]
    return _checked_text("\n".join(pieces), name, limits), urls


def _checked_text(text: str, name: str, limits: check.Limits) -> str:
    with field_named("messages"):
        return check.text(text, name, limits)


def chat_response(request: ChatRequest, result: TextResult | DrawResult, model: str) -> dict:
    created = int(time.time())
    out = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created, "model": model}
    if isinstance(result, TextResult):
        work = request.work
        out["choices"] = [{
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None,
            "finish_reason": finish_reason(result, work.sampling["max_new_tokens"]),
        }]
        out["usage"] = usage(result.tokens)
    else:
        thought = [{"type": "text", "text": result.reasoning.text}] if result.reasoning is not None else []
        out["choices"] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": thought + [
                    {"type": "image_url", "image_url": {"url": png_data_uri(image)}}
                ]},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i, image in enumerate(result.images)
        ]
        out["usage"] = usage(len(result.reasoning.token_ids) if result.reasoning is not None else 0)
    out.update(reasoning_fields(result.reasoning))
    return out


def reasoning_fields(reasoning: Reasoning | None) -> dict:
    """vLLM-Omni's ``cot_output`` and our ``reasoning`` extension (to send back for drawing), if there was one."""
    if reasoning is None:
        return {}
    return {"cot_output": reasoning.text, "reasoning": reasoning.to_dict()}


def usage(completion_tokens: int) -> dict:
    """vLLM's UsageInfo; the prompt is not counted (the pipeline does not report its length): 0."""
    return {"prompt_tokens": 0, "completion_tokens": completion_tokens, "total_tokens": completion_tokens}


def finish_reason(result: TextResult, max_new_tokens: int) -> str:
    """``length`` when the answer used every allowed token (a stop token may be the last of them)."""
    return "length" if result.tokens >= max_new_tokens else "stop"


def chat_chunk(chunk_id: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


# ----------------------------------------------------------------------------------------------
# Images API
# ----------------------------------------------------------------------------------------------
@dataclass
class ImagesRequest:
    work: DrawWork
    stream: bool
    edit: bool
    output_format: str = "png"
    quality: int = 100


def parse_images(fields: Fields, settings: ServerSettings, images: list[Image.Image], *, edit: bool) -> ImagesRequest:
    check_model(fields, settings)
    refuse_unsupported(fields)
    fields = merge_extra_params(fields)
    fmt, quality = output_format(fields)
    limits = settings.limits
    prompt = fields.string("prompt", required=True, limits=limits)
    n = fields.integer("n", 1, limits.max_output_images, default=1)
    width, height = size_of(fields, settings)
    reasoning = parse_reasoning(fields)
    stream = bool(fields.boolean("stream", default=False))
    with field_named("system_prompt"):
        system_prompt = check.system_prompt(fields.raw("system_prompt"), limits)
    steps_field = draw_settings(fields, settings, width, height)
    previews = fields.integer("partial_images", 0, limits.max_steps, default=0)
    request = DrawRequest(prompt=prompt, images=tuple(images), seed=seed_of(fields, limits), num_images=n,
                          system_prompt=system_prompt, reasoning=reasoning, **steps_field)
    work = DrawWork(request, think=think_settings(fields, settings, reasoning), previews=previews, stream=stream,
                    loras=parse_lora(fields, settings))
    return ImagesRequest(work, stream=stream, edit=edit, output_format=fmt, quality=quality)


MAX_LORAS = 8


def parse_lora(fields: Fields, settings: ServerSettings) -> tuple[tuple[str, float], ...] | None:
    """vLLM-Omni's ``lora`` field: ``{"name", "path", "scale"}`` or a list of them → adapter files and scales.

    Only adapters inside the operator's ``--lora-dir`` folders: ``name`` is a file stem there, ``path`` a
    file there (relative to a folder, or absolute but inside one); anything else is refused. None: the
    request names no adapter (the server's own ``--lora`` adapters apply).
    """
    value = fields.raw("lora")
    if value is None:
        return None
    entries = value if isinstance(value, list) else [value]
    if not settings.lora_dirs:
        raise bad_request("lora", "lora: this server allows no per-request adapters (start it with --lora-dir)")
    if not entries or len(entries) > MAX_LORAS or not all(isinstance(e, dict) for e in entries):
        raise bad_request("lora", f"lora must be an object {{name, path, scale}} or a list of 1-{MAX_LORAS} of them")
    chosen = []
    for entry in entries:
        unknown = sorted(set(entry) - {"name", "path", "scale", "int_id", "local_path"})
        if unknown:
            raise bad_request("lora", f"lora: unknown field {unknown[0]!r} (use name, path, scale)")
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -10 <= scale <= 10:
            raise bad_request("lora", "lora.scale must be a number between -10 and 10")
        chosen.append((str(_allowed_adapter(entry, settings.lora_dirs)), float(scale)))
    return tuple(chosen)


def _allowed_adapter(entry: dict, folders: tuple[Path, ...]) -> Path:
    path, name = entry.get("path", entry.get("local_path")), entry.get("name")
    if path is not None and not isinstance(path, str) or name is not None and not isinstance(name, str):
        raise bad_request("lora", "lora.name and lora.path must be strings")
    candidates = []
    for folder in folders:
        root = folder.resolve()
        if path:
            candidates.append((root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve())
        elif name:
            candidates.append((root / f"{name}.safetensors").resolve())
        else:
            raise bad_request("lora", "lora needs a name or a path")
        found = candidates[-1]
        if found.is_relative_to(root) and found.suffix == ".safetensors" and found.is_file():
            return found
    shown = path or name
    raise bad_request("lora", f"lora {shown!r} is not an adapter in this server's LoRA folders")


def images_response(result: DrawResult, request: ImagesRequest) -> dict:
    first = result.images[0]
    out = {
        "created": int(time.time()),
        "data": [{"b64_json": b64(encode(image, request.output_format, request.quality))} for image in result.images],
        "output_format": request.output_format,
        "size": f"{first.width}x{first.height}",
    }
    out.update(reasoning_fields(result.reasoning))
    return out
