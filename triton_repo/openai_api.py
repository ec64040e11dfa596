"""OpenAI-compatible chat completions with images, in front of the Triton deployment.

    nvlm-serve BUILD --openai-port 9000        # beside Triton's gRPC and HTTP ports
    client = openai.OpenAI(base_url="http://127.0.0.1:9000/v1", api_key="-")
    client.chat.completions.create(model="nvlm", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What shapes are in this picture?"}]}])

FastAPI + uvicorn; every request goes to the Triton entry model `nvlm` over gRPC (clients/triton_client.py), so
the ensemble stays the one engine and this layer only translates: the conversation becomes the entry's
`messages` input (each image part an <image> placeholder where it stood, its bytes in `image_bytes`),
the parameters become the entry's inputs (`max_tokens`, `temperature`, `top_p`, `seed`, `stop` →
`stop_words`, the penalties, `logprobs` → `return_log_probs`), and the answer becomes a completion
(server-sent events when `stream` is true), with `usage` from the entry's token counts.

Images: `data:` URLs only by default. Remote http(s) URLs are refused — fetching them would let any client
make the server call arbitrary hosts (SSRF). Local files (`file://` URLs or paths) only under the directory
the operator names with `--openai-image-dir`. Errors are OpenAI error objects with a 4xx status (429 when
the server is busy), and the next request is served.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (its `Request`, imported
# lazily inside create_app) at definition time
import asyncio
import base64
import binascii
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from clients.triton_client import ClientError, NVLMClient
from runtime.core import request_schema as schema
from runtime.core.errors import InputError
from runtime.tokenizer import NVLMTokenizer

MAX_IMAGE_BYTES = 64 << 20  # a data: URL larger than this is refused before it is decoded


class APIError(Exception):
    """An OpenAI error object: the HTTP status, a message, its type, the offending parameter and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _image_bytes(url: str, image_dir: Path | None) -> bytes:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head or not data:
            raise APIError(400, "an image data: URL must be base64 (data:image/png;base64,...)", param="messages")
        if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise APIError(400, f"image larger than {MAX_IMAGE_BYTES >> 20} MiB", param="messages")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "an image data: URL does not hold valid base64", param="messages") from None
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched by this server (it would call arbitrary hosts); "
                            "send the image inline as a data: URL", param="messages", code="image_url_not_allowed")
    path = url[len("file://"):] if url.startswith("file://") else url
    if image_dir is None:
        raise APIError(400, "local image paths are off (the operator can allow a directory with "
                            "--openai-image-dir); send the image as a data: URL", param="messages",
                       code="image_url_not_allowed")
    p = (image_dir / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if not p.is_relative_to(image_dir) or not p.is_file():
        raise APIError(400, f"image {path!r} is not a file under the allowed image directory", param="messages",
                       code="image_url_not_allowed")
    return p.read_bytes()


def conversation(messages: Any, image_dir: Path | None) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages → (the entry's `messages` [{"role", "content"}], image bytes in placeholder order)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}] needs a role: system, user or assistant", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise APIError(400, f"messages[{i}]: image_url needs a url", param="messages")
                    images.append(_image_bytes(url, image_dir))
                    parts.append("<image>\n")
                else:
                    raise APIError(400, f"messages[{i}]: content parts must be text or image_url, got {kind!r}",
                                   param="messages")
            text = "".join(parts)
        elif content is None and role == "assistant":
            text = ""
        else:
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        out.append({"role": role, "content": text})
    return out, images


def _number(body: dict, name: str, kind, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise APIError(400, f"{name} must be a {'integer' if kind is int else 'number'}", param=name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"{name} must be in [{lo}, {hi}], got {v}", param=name)
    return kind(v)


class ChatRequest:
    """A parsed /v1/chat/completions body: the entry model's inputs."""

    def __init__(self, body: Any, model: str, image_dir: Path | None, default_max_tokens: int):
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") != model:
            raise APIError(404, f"model {body.get('model')!r} does not exist; this server serves {model!r}",
                           param="model", code="model_not_found")
        self.messages, self.images = conversation(body.get("messages"), image_dir)
        if (_number(body, "n", int, 1, 1) or 1) != 1:
            raise APIError(400, "n must be 1", param="n")
        mt = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
        self.max_tokens = mt or default_max_tokens
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        if body.get("top_logprobs"):
            raise APIError(400, "top_logprobs is not supported (logprobs of the chosen tokens are)", param="top_logprobs")
        # every decoding parameter of the request schema, under its OpenAI field (vLLM's extensions for the rest)
        self.params = schema.from_openai(body, lambda message, field: APIError(400, message, param=field))
        try:
            schema.validate(self.params, self.max_tokens)
        except InputError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        self.stream = bool(body.get("stream"))
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def generate(self, client: NVLMClient, on_text=None):
        params = dict(self.params)
        sampled = (params.get("temperature") or 0.0) > 0
        # OpenAI's defaults: top_p 1 and no top-k cut when sampling; greedy otherwise (the entry's top_k 1)
        params.setdefault("top_k", 0 if sampled else 1)
        if not sampled:
            params.pop("top_p", None)
        extra = {"messages": ("BYTES", np.array([json.dumps(self.messages).encode()], dtype=object)),
                 "return_num_input_tokens": ("BOOL", np.array([True])),
                 "return_num_output_tokens": ("BOOL", np.array([True]))}
        return client.generate("", self.images, max_tokens=self.max_tokens, stream=on_text is not None,
                               on_text=on_text, extra=extra, **params)


def _status(e: ClientError) -> APIError:
    msg = str(e)
    if "server busy" in msg:
        return APIError(429, msg, type_="server_busy", code="server_busy")
    if "cannot reach" in msg or "not ready" in msg or "no response" in msg:
        return APIError(503, msg, type_="server_error")
    return APIError(400, msg.removeprefix("server error: "))


def create_app(grpc_url: str, *, model: str = "nvlm", triton_model: str = "nvlm", image_dir: str | Path | None = None,
               default_max_tokens: int = 256, timeout: float = 300.0, tokenizer_dir: str | Path | None = None):
    """The FastAPI application (uvicorn runs it: `OpenAIServer`). `tokenizer_dir`: the build's tokenizer,
    for the token strings of `logprobs` (ids otherwise)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="nvlm-trt OpenAI-compatible API")
    created = int(time.time())
    allowed = Path(image_dir).resolve() if image_dir else None
    tok = NVLMTokenizer.from_dir(tokenizer_dir) if tokenizer_dir is not None and Path(tokenizer_dir).is_dir() else None

    def error(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error(e)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "nvlm-trt"}]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        if name != model:
            raise APIError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return {"id": model, "object": "model", "created": created, "owned_by": "nvlm-trt"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        req = ChatRequest(body, model, allowed, default_max_tokens)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        client = NVLMClient(grpc_url, triton_model, timeout=timeout)
        if not req.stream:
            try:
                ans = await asyncio.to_thread(req.generate, client)
            except ClientError as e:
                raise _status(e) from None
            return {"id": rid, "object": "chat.completion", "created": now, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                                 "logprobs": _logprobs(ans, tok) if req.params.get("return_log_probs") else None,
                                 "finish_reason": _finish(ans, req)}],
                    "usage": _usage(ans)}
        stream = _Stream(req, client)
        first = await stream.first()
        return StreamingResponse(_events(stream, first, rid, now, model, tok), media_type="text/event-stream")

    return app


def _usage(ans) -> dict:
    p, c = ans.counts.get("num_input_tokens", 0), ans.counts.get("num_output_tokens", len(ans.tokens))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(ans, req: ChatRequest) -> str:
    return "length" if ans.counts.get("num_output_tokens", len(ans.tokens)) >= req.max_tokens else "stop"


def _logprobs(ans, tok) -> dict:
    """The chosen tokens' log-probs (no alternatives: top_logprobs is refused)."""
    out = []
    for t, lp in zip(ans.tokens, ans.log_probs or []):
        text = tok.decode([t], skip_special_tokens=False) if tok is not None else str(t)
        out.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []})
    return {"content": out}


class _Stream:
    """A streamed request: the gRPC stream runs on a worker thread and hands its text deltas (then the
    answer, or the error) over through a queue to the event loop."""

    DONE = object()

    def __init__(self, req: ChatRequest, client: NVLMClient):
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()
        self.req = req
        threading.Thread(target=self._work, args=(client,), daemon=True).start()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, item)

    def _work(self, client: NVLMClient) -> None:
        try:
            self._put((self.DONE, self.req.generate(client, on_text=self._put)))
        except ClientError as e:
            self._put((self.DONE, _status(e)))

    async def first(self):
        """The first non-empty delta, or the end: an error before any text is an ordinary 4xx response."""
        while True:
            item = await self.q.get()
            if isinstance(item, tuple) and item[0] is self.DONE and isinstance(item[1], APIError):
                raise item[1]
            if item:
                return item


async def _events(stream: _Stream, first, rid: str, now: int, model: str, tok):
    """Server-sent events: a role chunk, one chunk per text delta, the finish chunk, usage if asked, [DONE]."""
    req = stream.req

    def chunk(delta: dict | None, finish=None, usage=None) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    item = first
    while not (isinstance(item, tuple) and item[0] is _Stream.DONE):
        if item:
            yield chunk({"content": item})
        item = await stream.q.get()
    result = item[1]
    if isinstance(result, APIError):  # the stream has started: the error travels as an event
        yield f"data: {json.dumps(result.body())}\n\n"
    else:
        if req.params.get("return_log_probs"):
            body = json.loads(chunk({})[len("data: "):])
            body["choices"][0]["logprobs"] = _logprobs(result, tok)
            yield f"data: {json.dumps(body)}\n\n"
        yield chunk({}, finish=_finish(result, req))
        if req.include_usage:
            yield chunk(None, usage=_usage(result))
    yield "data: [DONE]\n\n"


class OpenAIServer:
    """uvicorn serving `create_app(...)` on a background thread (started and stopped by nvlm-serve)."""

    def __init__(self, grpc_url: str, host: str, port: int, **kw):
        import uvicorn

        config = uvicorn.Config(create_app(grpc_url, **kw), host=host, port=port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="openai-api", daemon=True)
        self.url = f"http://{host}:{port}/v1"

    def start(self, timeout: float = 30.0) -> "OpenAIServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the OpenAI API server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
