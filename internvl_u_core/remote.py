"""``RemoteInternVLU``: the pipeline's friendly methods, answered by a server over HTTP.

A second implementation of :class:`~internvl_u_core.InternVLUPipeline`'s interface for adapters
(``understand``, ``understand_each``, ``reason``, ``generate``, ``edit``, ``decode_latents_preview``,
``limits``), so a
node or a tool cannot tell which one it was given. It speaks ``internvl-u serve``'s protocol
(vLLM-Omni's InternVL-U dialect of the OpenAI API, plus the ``reasoning``/``think`` extension
fields) through httpx, the ``[remote]`` extra. Arguments are checked here first with the core's
own validation, so bad ones fail the same way, without a round trip.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace

from PIL import Image

from . import validation as check
from .errors import GenerationCancelled, InternVLUError, InvalidInputError, InvalidInputTypeError
from .files import png_bytes, png_data_uri
from .limits import DEFAULT_ANSWER_TOKENS, DEFAULT_LIMITS, DEFAULT_REASONING_TOKENS, DEFAULT_STEPS
from .options import API_KEY_ENV, is_server_url
from .pipeline import Reasoning, check_reasoning
from .sampling import StepCallback
from .textgen import TextCallback, TokenCallback

MISSING_EXTRA = (
    'RemoteInternVLU needs httpx; install the [remote] extra: pip install -e ".[remote]" in your clone, '
    'or pip install "httpx>=0.27"'
)
class RemoteError(InternVLUError):
    """The server could not be reached, or refused a request for a reason other than its arguments.

    ``status_code`` is the HTTP status (``None`` when there was no answer), ``code`` the error code
    the server gave (e.g. ``queue_full``), ``retry_after`` its ``Retry-After`` in seconds.
    """

    def __init__(self, message: str, status_code: int | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.retry_after = retry_after


class RemoteInternVLU:
    """A served InternVL-U (``internvl-u serve``) behind the pipeline's friendly methods.

    ``base_url`` is the server's address (``http://host:8091``; a trailing ``/v1`` is accepted),
    ``api_key`` its ``--api-key`` (``None``: ``$INTERNVL_U_API_KEY`` if set; ``""``: no key), ``timeout``
    the seconds one request may take, ``model`` the name to send (``None``: the server's only model).
    Results equal the in-process pipeline's for the same arguments and seed.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 600.0,
                 model: str | None = None):
        try:
            import httpx
        except ImportError as exc:
            raise ImportError(MISSING_EXTRA) from exc
        if not is_server_url(base_url):
            raise InvalidInputError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8091', got {base_url!r}")
        base = base_url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.limits = replace(DEFAULT_LIMITS)  # for checks made here (as the pipeline's); the server applies its own
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.base_url, headers=headers,
                                    timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteInternVLU:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteInternVLU({self.base_url!r})"

    # ------------------------------------------------------------------------------------------
    # Friendly jobs (same arguments, results and errors as InternVLUPipeline's)
    # ------------------------------------------------------------------------------------------
    def understand(
        self,
        images,
        question: str,
        *,
        max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        seed: int | None = None,
        system_prompt: str | None = None,
        token_callback: TokenCallback | None = None,
        text_callback: TextCallback | None = None,
    ) -> str:
        """Answer ``question`` about zero, one or several images."""
        question = check.text(question, "question", self.limits)
        body = self._text_body(question, images, system_prompt, seed, think=False, max_new_tokens=max_new_tokens,
                               min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, num_beams=num_beams)
        return self._chat_text(body, token_callback, text_callback)["choices"][0]["message"]["content"]

    def understand_each(
        self,
        images,
        question: str,
        *,
        batch_size: int = 8,
        max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        seed: int | None = None,
        system_prompt: str | None = None,
        token_callback: TokenCallback | None = None,
        image_callback: Callable[[int, int], bool | None] | None = None,
    ) -> list[str]:
        """One answer per image, each the one ``understand(image, question)`` gives for that image alone.

        One request per image; ``batch_size`` is checked as in-process (how the server batches is its
        own affair). ``image_callback(done, total)`` follows each image; returning ``False`` stops the
        run with ``GenerationCancelled``.
        """
        question = check.text(question, "question", self.limits)
        pictures = check.image_each(images, "images", self.limits)
        check.integer(batch_size, "batch_size", 1, self.limits.max_images_per_prompt)
        answers = []
        for picture in pictures:
            answers.append(self.understand(
                [picture], question, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                do_sample=do_sample, temperature=temperature, top_p=top_p, num_beams=num_beams, seed=seed,
                system_prompt=system_prompt, token_callback=token_callback,
            ))
            if image_callback is not None and image_callback(len(answers), len(pictures)) is False:
                raise GenerationCancelled(f"understand_each was stopped by image_callback after {len(answers)} images")
        return answers

    def reason(
        self,
        prompt: str,
        images=None,
        *,
        max_new_tokens: int = DEFAULT_REASONING_TOKENS,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        seed: int | None = None,
        system_prompt: str | None = None,
        token_callback: TokenCallback | None = None,
        text_callback: TextCallback | None = None,
    ) -> Reasoning:
        """The chain-of-thought the model writes before drawing (reusable by ``generate``/``edit``)."""
        prompt = check.text(prompt, "prompt", self.limits)
        body = self._text_body(prompt, images, system_prompt, seed, think=True, max_new_tokens=max_new_tokens,
                               min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, num_beams=num_beams)
        return _reasoning(self._chat_text(body, token_callback, text_callback))

    def generate(
        self,
        prompt: str,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULT_STEPS,
        all_cfg_scale: float | None = None,
        part_cfg_scale: float | None = None,
        timestep_trunc: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        generator=None,
        num_images: int = 1,
        reasoning: Reasoning | None = None,
        system_prompt: str | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Text to image. With ``reasoning`` from :meth:`reason` this equals ``text_image`` mode."""
        prompt = check.text(prompt, "prompt", self.limits)
        fields = self._draw_fields(prompt, [], width, height, steps, all_cfg_scale, part_cfg_scale, timestep_trunc,
                                   flow_shift, seed, generator, num_images, reasoning, system_prompt, callback)
        return self._images("/v1/images/generations", callback, json_body=fields)

    def edit(
        self,
        images,
        instruction: str,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULT_STEPS,
        all_cfg_scale: float | None = None,
        part_cfg_scale: float | None = None,
        timestep_trunc: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        generator=None,
        num_images: int = 1,
        reasoning: Reasoning | None = None,
        system_prompt: str | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Edit one or several input images following ``instruction``; output size defaults to the first input's."""
        instruction = check.text(instruction, "instruction", self.limits)
        pictures = check.image_list(images, "images", allow_empty=False, limits=self.limits)
        fields = self._draw_fields(instruction, pictures, width, height, steps, all_cfg_scale, part_cfg_scale,
                                   timestep_trunc, flow_shift, seed, generator, num_images, reasoning, system_prompt,
                                   callback)
        form = {name: _form_value(value) for name, value in fields.items()}
        files = [("image", (f"image{i}.png", png_bytes(picture), "image/png")) for i, picture in enumerate(pictures)]
        return self._images("/v1/images/edits", callback, form=form, files=files)

    def decode_latents_preview(self, preview) -> Image.Image:
        """The preview a ``callback`` received (the server sends it ready-made) as an RGB image."""
        if not isinstance(preview, Image.Image):
            raise InvalidInputTypeError("a remote callback's third argument is already the preview image")
        return preview

    # ------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------
    def _text_body(self, text, images, system_prompt, seed, *, think, **sampling) -> dict:
        pictures = check.image_list(images, "images", allow_empty=True, limits=self.limits)
        sampling = check.text_kwargs(sampling, default_max_new_tokens=None, limits=self.limits)
        system_prompt = check.system_prompt(system_prompt, self.limits)
        content = [{"type": "image_url", "image_url": {"url": png_data_uri(p)}} for p in pictures]
        content.append({"type": "text", "text": text})
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": content})
        body = {
            "messages": messages, "modalities": ["text"], "think": think,
            "max_tokens": sampling["max_new_tokens"], "min_tokens": sampling.get("min_new_tokens", 0),
            "do_sample": sampling.get("do_sample", False), "num_beams": sampling.get("num_beams", 1),
            "seed": check.optional_seed(seed, self.limits),
        }
        if body["do_sample"]:
            body.update(temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0))
        else:
            body["temperature"] = 0  # greedy, in OpenAI's (and vLLM's) words too
        return self._with_model(body)

    def _draw_fields(self, prompt, pictures, width, height, steps, all_cfg_scale, part_cfg_scale, timestep_trunc,
                     flow_shift, seed, generator, num_images, reasoning, system_prompt, callback) -> dict:
        if generator is not None:
            raise InvalidInputTypeError("generator cannot be sent to a server; pass seed=... instead")
        check_reasoning(reasoning, len(pictures))
        for name, side in (("width", width), ("height", height)):
            if side is not None:
                check.integer(side, name, self.limits.min_side, self.limits.max_side)
        steps = check.steps(steps, self.limits)
        # Both sides as OpenAI's size; one side alone in the width/height extension fields (the pipeline
        # then uses it for both, as in-process).
        size = f"{width}x{height}" if width is not None and height is not None else None
        fields = {
            "prompt": prompt, "n": check.num_images(num_images, self.limits), "size": size,
            "width": width if size is None else None, "height": height if size is None else None,
            "num_inference_steps": steps, "seed": check.optional_seed(seed, self.limits),
            "all_cfg_scale": _optional_scale(all_cfg_scale, "all_cfg_scale", self.limits),
            "part_cfg_scale": _optional_scale(part_cfg_scale, "part_cfg_scale", self.limits),
            "timestep_trunc": None if timestep_trunc is None else check.finite(timestep_trunc, "timestep_trunc"),
            "flow_shift": None if flow_shift is None else check.positive(flow_shift, "flow_shift"),
            "system_prompt": check.system_prompt(system_prompt, self.limits),
            "reasoning": None if reasoning is None else reasoning.to_dict(),
            "think": False,  # local generate/edit never think first, whatever the server's default
            "response_format": "b64_json",
        }
        if callback is not None:  # progress with a preview at every step
            fields.update(stream=True, partial_images=steps)
        return self._with_model({k: v for k, v in fields.items() if v is not None})

    def _with_model(self, body: dict) -> dict:
        if self.model is not None:
            body["model"] = self.model
        return body

    def _chat_text(self, body: dict, token_callback, text_callback) -> dict:
        """A chat completion; streamed (one chunk per token) when a callback wants progress."""
        if token_callback is None and text_callback is None:
            return self._post_json("/v1/chat/completions", body)
        body["stream"] = True
        total = body["max_tokens"]
        text, tokens, final = "", 0, None
        with contextlib.closing(self._events("/v1/chat/completions", json=body)) as stream:
            for data in stream:
                choice = data["choices"][0]
                delta = choice.get("delta") or {}
                if choice.get("finish_reason") is not None:  # may carry text the last token held back
                    final = data
                    if delta.get("content"):
                        text += delta["content"]
                        if text_callback is not None:
                            check.run_text_callback(text_callback, text)
                    continue
                if "role" in delta:  # the opening chunk carries no token
                    continue
                tokens += 1
                text += delta.get("content") or ""
                if token_callback is not None and token_callback(tokens, total) is False:
                    raise GenerationCancelled("text generation was stopped by the progress callback")
                if text_callback is not None:
                    check.run_text_callback(text_callback, text)
        if final is None:
            raise RemoteError("the server ended the stream without a final chunk")
        final["choices"][0]["message"] = {"role": "assistant", "content": text}
        return final

    def _images(self, path: str, callback, *, json_body=None, form=None, files=None) -> list[Image.Image]:
        if callback is None:
            if json_body is not None:
                answer = self._post_json(path, json_body)
            else:
                answer = self._request("POST", path, data=form, files=files).json()
            return [_image(item["b64_json"]) for item in answer["data"]]
        pictures: dict[int, Image.Image] = {}
        with contextlib.closing(self._events(path, json=json_body, data=form, files=files)) as stream:
            for data in stream:
                kind = data.get("type", "")
                if kind.endswith(".completed"):
                    pictures[data.get("index", len(pictures))] = _image(data["b64_json"])
                elif kind.endswith((".partial_image", ".progress")):
                    preview = _image(data["b64_json"]) if "b64_json" in data else None
                    check.run_callback(callback, data["step"], data["total_steps"], preview)
        if not pictures:
            raise RemoteError("the server ended the stream without an image")
        return [pictures[i] for i in sorted(pictures)]

    # ------------------------------------------------------------------------------------------
    # HTTP
    # ------------------------------------------------------------------------------------------
    def _post_json(self, path: str, body: dict) -> dict:
        return self._request("POST", path, json=body).json()

    def _request(self, method: str, path: str, **kwargs):
        try:
            response = self._client.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the InternVL-U server at {self.base_url}: {exc}") from exc
        _raise_for_status(response)
        return response

    def _events(self, path: str, **kwargs) -> Iterator[dict]:
        """The JSON payloads of a server-sent event stream; leaving the loop early closes the connection,
        which cancels the job on the server."""
        try:
            with self._client.stream("POST", path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_status(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    data = json.loads(payload)
                    if "error" in data and isinstance(data["error"], dict):
                        _raise_error(data["error"], None, None)
                    yield data
        except self._httpx.HTTPError as exc:
            raise RemoteError(f"the connection to {self.base_url} failed: {exc}") from exc


def _raise_for_status(response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"message": response.text[:500] or f"HTTP {response.status_code}"}
    retry = response.headers.get("retry-after")
    _raise_error(error, response.status_code, float(retry) if retry and retry.isdigit() else None)


def _raise_error(error: dict, status: int | None, retry_after: float | None):
    message = str(error.get("message") or error)
    code = error.get("code")
    if status in (400, 404, 413, 422) or (status is None and code == "invalid_value"):
        raise InvalidInputError(message)
    raise RemoteError(message, status_code=status, code=code, retry_after=retry_after)


def _optional_scale(value, name: str, limits) -> float | None:
    return None if value is None else check.guidance_scale(value, name, limits)


def _form_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image


def _reasoning(answer: dict) -> Reasoning:
    data = answer.get("reasoning")
    if not isinstance(data, dict):
        raise RemoteError("the server's answer carries no 'reasoning' object; is it an internvl-u server?")
    return Reasoning.from_dict(data)
