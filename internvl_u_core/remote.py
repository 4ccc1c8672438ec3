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
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from PIL import Image

from . import validation as check
from .draw_request import DrawRequest
from .errors import GenerationCancelled, InternVLUError, InvalidInputError, InvalidInputTypeError
from .files import png_bytes, png_data_uri
from .limits import DEFAULT_ANSWER_TOKENS, DEFAULT_LIMITS, DEFAULT_REASONING_TOKENS, DEFAULT_STEPS, random_seed
from .options import API_KEY_ENV, is_server_url
from .pipeline import Reasoning
from .sampling import StepCallback
from .textgen import TextCallback, TokenCallback

MISSING_EXTRA = (
    'RemoteInternVLU needs httpx; install the [remote] extra: pip install -e ".[remote]" in your clone, '
    'or pip install "httpx>=0.27"'
)
#: The longest wait between two attempts of a request, in seconds (a server's Retry-After included).
MAX_RETRY_WAIT = 30.0

logger = logging.getLogger("internvl_u_core.remote")


class RemoteError(InternVLUError):
    """The server could not be reached, or refused a request for a reason other than its arguments.

    ``status_code`` is the HTTP status (``None`` when there was no answer), ``code`` the error code
    the server gave (e.g. ``queue_full``), ``retry_after`` its ``Retry-After`` in seconds.
    ``retryable``: the same request may succeed if sent again (a 503, a dropped connection).
    """

    def __init__(self, message: str, status_code: int | None = None, code: str | None = None,
                 retry_after: float | None = None, *, retryable: bool | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.retry_after = retry_after
        self.retryable = (status_code == 503 or code in ("replica_unavailable", "shutting_down")) if retryable is None else retryable


class RemoteInternVLU:
    """A served InternVL-U (``internvl-u serve``) behind the pipeline's friendly methods.

    ``base_url`` is the server's address (``http://host:8091``; a trailing ``/v1`` is accepted),
    ``api_key`` its ``--api-key`` (``None``: ``$INTERNVL_U_API_KEY`` if set; ``""``: no key), ``timeout``
    the seconds one request may take, ``model`` the name to send (``None``: the server's only model).
    Results equal the in-process pipeline's for the same arguments and seed.

    A request answered 503 (a replica restarting, a server shutting down) or whose connection
    dropped is sent again up to ``retries`` times, after ``backoff`` seconds, doubled each time (or
    the server's ``Retry-After`` if longer; at most 30 s). That is safe because every request is
    deterministic: one given no seed gets one chosen here, before its first attempt. A streamed
    request starts over, so its callbacks see the progress again from the first step.
    ``retries=0`` sends each request once.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 600.0,
                 model: str | None = None, retries: int = 3, backoff: float = 1.0):
        try:
            import httpx
        except ImportError as exc:
            raise ImportError(MISSING_EXTRA) from exc
        if not is_server_url(base_url):
            raise InvalidInputError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8091', got {base_url!r}")
        base = base_url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.retries = check.integer(retries, "retries", 0, 100)
        self.backoff = check.finite(backoff, "backoff")
        if self.backoff < 0:
            raise InvalidInputError(f"backoff must be 0 or more seconds, got {backoff}")
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
        request = DrawRequest(
            prompt, (), seed, num_images, width, height, steps, all_cfg_scale, part_cfg_scale, timestep_trunc,
            flow_shift, system_prompt, reasoning,
        )
        fields = self._draw_fields(request, generator, callback)
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
        request = DrawRequest(
            instruction, tuple(pictures), seed, num_images, width, height, steps, all_cfg_scale, part_cfg_scale,
            timestep_trunc, flow_shift, system_prompt, reasoning,
        )
        fields = self._draw_fields(request, generator, callback)
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
            "seed": self._seed(seed),
        }
        if body["do_sample"]:
            body.update(temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0))
        else:
            body["temperature"] = 0  # greedy, in OpenAI's (and vLLM's) words too
        return self._with_model(body)

    def _draw_fields(self, request: DrawRequest, generator, callback) -> dict:
        if generator is not None:
            raise InvalidInputTypeError("generator cannot be sent to a server; pass seed=... instead")
        request = request.checked(self.limits)
        request = replace(request, seed=self._seed(request.seed))  # a retry repeats the same seed
        fields = {
            **request.wire_fields(),
            "think": False,  # local generate/edit never think first, whatever the server's default
            "response_format": "b64_json",
        }
        if callback is not None:  # progress with a preview at every step
            fields.update(stream=True, partial_images=request.steps)
        return self._with_model(fields)

    def _seed(self, seed) -> int | None:
        """The checked seed; when retrying, one chosen here for a request given none (retries repeat it)."""
        seed = check.optional_seed(seed, self.limits)
        return random_seed() if seed is None and self.retries else seed

    def _with_model(self, body: dict) -> dict:
        if self.model is not None:
            body["model"] = self.model
        return body

    def _chat_text(self, body: dict, token_callback, text_callback) -> dict:
        """A chat completion; streamed (one chunk per token) when a callback wants progress."""
        if token_callback is None and text_callback is None:
            return self._post_json("/v1/chat/completions", body)
        body["stream"] = True
        return self._retrying(lambda: self._stream_chat(body, token_callback, text_callback))

    def _stream_chat(self, body: dict, token_callback, text_callback) -> dict:
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
            raise RemoteError("the server ended the stream without a final chunk", retryable=True)
        final["choices"][0]["message"] = {"role": "assistant", "content": text}
        return final

    def _images(self, path: str, callback, *, json_body=None, form=None, files=None) -> list[Image.Image]:
        if callback is None:
            if json_body is not None:
                answer = self._post_json(path, json_body)
            else:
                answer = self._retrying(lambda: self._request("POST", path, data=form, files=files).json())
            return [_image(item["b64_json"]) for item in answer["data"]]
        return self._retrying(lambda: self._stream_images(path, callback, json_body, form, files))

    def _stream_images(self, path: str, callback, json_body, form, files) -> list[Image.Image]:
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
            raise RemoteError("the server ended the stream without an image", retryable=True)
        return [pictures[i] for i in sorted(pictures)]

    # ------------------------------------------------------------------------------------------
    # HTTP
    # ------------------------------------------------------------------------------------------
    def _post_json(self, path: str, body: dict) -> dict:
        return self._retrying(lambda: self._request("POST", path, json=body).json())

    def _retrying(self, attempt: Callable[[], object]):
        """``attempt()``, made again after a retryable failure, at most ``retries`` more times."""
        for number in range(1, self.retries + 2):
            try:
                return attempt()
            except RemoteError as exc:
                if not exc.retryable or not self.retries:
                    raise
                if number > self.retries:
                    raise RemoteError(
                        f"{exc} (gave up after {number} attempts; RemoteInternVLU(retries=...) sets how many)",
                        exc.status_code, exc.code, exc.retry_after, retryable=True,
                    ) from exc
                wait = min(max(self.backoff * 2 ** (number - 1), exc.retry_after or 0.0), MAX_RETRY_WAIT)
                logger.warning("%s: %s; attempt %d of %d in %.1f s", self.base_url, exc, number + 1,
                               self.retries + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _dropped(self, exc) -> bool:
        """A connection refused, reset or cut short (worth another attempt), not a timeout."""
        return isinstance(exc, self._httpx.TransportError) and not isinstance(
            exc, (self._httpx.ReadTimeout, self._httpx.WriteTimeout, self._httpx.PoolTimeout))

    def _request(self, method: str, path: str, **kwargs):
        try:
            response = self._client.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the InternVL-U server at {self.base_url}: {exc}",
                              retryable=self._dropped(exc)) from exc
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
            raise RemoteError(f"the connection to {self.base_url} failed: {exc}", retryable=self._dropped(exc)) from exc


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
