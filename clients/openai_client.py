"""The benchmark's client for the OpenAI-compatible endpoint (`nvlm-serve --openai-port`): the same
`generate` / `check` / `close` as `NVLMClient`, over the official `openai` package, so `nvlm-bench` drives
either endpoint with one load generator. Each streamed chunk is stamped on arrival; token counts come
from the final `usage` (the server sends it with `stream_options.include_usage`)."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from clients.triton_client import Answer, ClientError
from runtime.core import request_schema as schema

# the request fields of OpenAI's own API; the other parameters travel as extensions in the body (vLLM's way)
OPENAI_FIELDS = frozenset({"temperature", "top_p", "seed", "stop", "logprobs", "presence_penalty", "frequency_penalty"})


def _content(prompt: str, images) -> list[dict] | str:
    """The prompt with each <image> placeholder replaced by an image part (images first if it has none)."""
    if not images:
        return prompt
    blobs = [Path(i).read_bytes() if isinstance(i, (str, Path)) else bytes(i) for i in images]
    urls = ["data:image/png;base64," + base64.b64encode(b).decode() for b in blobs]
    pieces = prompt.split("<image>")
    if len(pieces) == 1:
        pieces = [""] * len(urls) + [prompt.lstrip("\n")]
    if len(pieces) != len(urls) + 1:
        raise ClientError(f"the prompt has {len(pieces) - 1} <image> placeholders for {len(urls)} images")
    parts: list[dict] = []
    for text, url in zip(pieces, urls):
        if text:
            parts.append({"type": "text", "text": text})
        parts.append({"type": "image_url", "image_url": {"url": url}})
    # the server writes each image as "<image>\n": drop the newline the placeholder carried
    rest = pieces[-1].removeprefix("\n")
    if rest:
        parts.append({"type": "text", "text": rest})
    return parts


class OpenAIChatClient:
    def __init__(self, url: str = "http://127.0.0.1:9000/v1", model: str = "nvlm", timeout: float = 300.0,
                 keep_stream: bool = False):
        import openai

        self.url, self.model = url, model
        self._openai = openai
        # one HTTP connection pool per client: requests reuse their connection (keep_stream has no
        # separate meaning over HTTP)
        self.client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout)

    def check(self) -> None:
        try:
            ids = [m.id for m in self.client.models.list().data]
        except self._openai.APIError as e:
            raise ClientError(f"cannot reach the OpenAI API at {self.url}: {e}") from None
        if self.model not in ids:
            raise ClientError(f"model {self.model!r} is not served at {self.url} (it serves {', '.join(ids)})")

    def close(self) -> None:
        self.client.close()

    def generate(self, prompt: str, images=(), *, max_tokens: int = 64, stream: bool = False, on_text=None,
                 extra: dict | None = None, **params) -> Answer:
        """As `NVLMClient.generate`; each request-schema parameter goes under its OpenAI field."""
        body: dict = {}
        for name, (_, arr) in (extra or {}).items():  # the gRPC extras the benchmark sends (min_tokens)
            body[name] = arr.reshape(-1)[0].item()
        temperature = params.get("temperature") or 0.0
        kw = dict(model=self.model, messages=[{"role": "user", "content": _content(prompt, images)}],
                  max_tokens=max_tokens, temperature=temperature, seed=params.get("seed") or 0, extra_body=body)
        for name, v in params.items():
            if v is None or v == () or name in ("temperature", "seed"):
                continue
            if name == "top_p" and not (temperature > 0 and v):  # OpenAI's top_p applies to sampling only
                continue
            p = schema.BY_NAME[name]
            (kw if p.openai_name in OPENAI_FIELDS else body)[p.openai_name] = list(v) if p.kind == "words" else v
        t0 = time.perf_counter()
        try:
            if not stream:
                r = self.client.chat.completions.create(**kw)
                text = r.choices[0].message.content or ""
                end = time.perf_counter() - t0
                return Answer(text, [], end, None, [text], [end], _counts(r.usage))
            chunks, times, usage, ttft = [], [], None, None
            for c in self.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                now = time.perf_counter() - t0
                if c.usage is not None:
                    usage = c.usage
                delta = c.choices[0].delta.content if c.choices else None
                if delta:
                    ttft = now if ttft is None else ttft
                    chunks.append(delta)
                    times.append(now)
                    if on_text:
                        on_text(delta)
            end = time.perf_counter() - t0
        except self._openai.APIError as e:
            raise ClientError(f"server error: {getattr(e, 'message', e)}") from None
        counts = _counts(usage)
        # no token ids over this API: one placeholder per generated token, so counts and rates line up
        tokens = [-1] * counts.get("num_output_tokens", len(chunks))
        return Answer("".join(chunks), tokens, end, ttft, chunks, times, counts)


def _counts(usage) -> dict:
    if usage is None:
        return {}
    return {"num_input_tokens": usage.prompt_tokens, "num_output_tokens": usage.completion_tokens}
