"""`nvlm-client`: ask an NVLM Triton deployment a question over gRPC (tritonclient), optionally streaming.

    nvlm-client --url 127.0.0.1:8001 --prompt "What is in <image>?" --image cat.png [--stream] [--json]

The entry model is decoupled, so both modes use the gRPC bidirectional stream; `--stream` prints
text as each token arrives. Connection and server errors become one clear message (exit 2).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.core import request_schema as schema
from runtime.core.errors import NVLMError


class ClientError(NVLMError):
    """The server is unreachable or answered with an error."""


@dataclass
class Answer:
    text: str
    tokens: list[int]
    seconds: float
    time_to_first_token: float | None
    chunks: list[str] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk, seconds after the send
    counts: dict = field(default_factory=dict)  # num_input_tokens / num_output_tokens, when asked for
    log_probs: list[float] | None = None  # per returned token, when asked for (return_log_probs)
    cum_log_prob: float | None = None


class NVLMClient:
    """One gRPC connection to the entry model. The model is decoupled, so every request goes over the
    bidirectional stream. `keep_stream=False` opens a stream per request and closes it after (what
    `nvlm-client` does); `keep_stream=True` keeps one stream open and sends each request on it as soon as
    the last one ended, the way perf_analyzer drives a decoupled model (one stream per concurrency slot).
    Requests on one client are sequential either way; `close()` ends a kept stream."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = "nvlm", timeout: float = 300.0,
                 keep_stream: bool = False):
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.timeout, self.keep_stream = url, model, timeout, keep_stream
        self._g = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self._responses: queue.Queue | None = None  # the open stream's responses

    def _open(self) -> queue.Queue:
        if self._responses is None:
            responses: queue.Queue = queue.Queue()

            def callback(result, error):
                # stamped on arrival in the stream's thread, as aiperf stamps a response when it is read:
                # a stamp taken after the queue hand-off would add thread-switch delays to every gap
                responses.put((time.perf_counter(), result, error))

            try:
                self.client.start_stream(callback=callback)
            except Exception as e:  # noqa: BLE001
                raise ClientError(f"cannot reach Triton at {self.url}: {e}") from None
            self._responses = responses
        return self._responses

    def close(self) -> None:
        """End the open stream, if any (closing a stream is client housekeeping, not request latency)."""
        if self._responses is not None:
            self._responses = None
            self.client.stop_stream()

    def check(self) -> None:
        try:
            ready = self.client.is_server_ready()
        except Exception as e:  # noqa: BLE001 — tritonclient raises its own InferenceServerException
            raise ClientError(f"cannot reach Triton at {self.url}: {e}") from None
        if not ready:
            raise ClientError(f"Triton at {self.url} is not ready")
        try:
            if not self.client.is_model_ready(self.model):
                raise ClientError(f"model {self.model!r} is not ready on {self.url}")
        except ClientError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ClientError(f"model {self.model!r} is not available on {self.url}: {e}") from None

    def _inputs(self, prompt, images, max_tokens, stream, extra):
        g = self._g

        def add(name, dtype, arr):
            t = g.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            return t

        inputs = [add("text_input", "BYTES", np.array([prompt.encode()], dtype=object)),
                  add("max_tokens", "INT32", np.array([max_tokens], np.int32)),
                  add("stream", "BOOL", np.array([stream], bool))]
        if images:
            blobs = [Path(i).read_bytes() if isinstance(i, (str, Path)) else bytes(i) for i in images]
            inputs.append(add("image_bytes", "BYTES", np.array(blobs, dtype=object)))
        for name, (dtype, arr) in extra.items():
            inputs.append(add(name, dtype, arr))
        return inputs

    def generate(self, prompt: str, images=(), *, max_tokens: int = 64, stream: bool = False, on_text=None,
                 extra: dict | None = None, exclude_input: bool | None = None, **params) -> Answer:
        """One request. `params`: decoding parameters by their request-schema names (runtime/core/
        request_schema.py: temperature, top_k, …, stop_words, bad_words, return_log_probs); None or absent:
        not sent, the server's default. `exclude_input`: False answers with the prompt first. `extra`: more
        entry inputs, name → (Triton dtype, array)."""
        unknown = set(params) - set(schema.BY_NAME)
        if unknown:
            raise TypeError(f"unknown request parameters {sorted(unknown)}; known: {', '.join(schema.BY_NAME)}")
        sent = schema.client_tensors(params)
        if exclude_input is not None:
            sent["exclude_input_in_output"] = ("BOOL", np.array([exclude_input]))
        inputs = self._inputs(prompt, images, max_tokens, stream, {**sent, **(extra or {})})
        t0 = time.perf_counter()  # a stream opened for this request counts in its latency; a kept one does not
        done = self._open()
        if self.keep_stream:
            t0 = time.perf_counter()
        ttft, chunks, tokens, times, counts = None, [], [], [], {}
        log_probs, cum = ([] if params.get("return_log_probs") else None), None
        end, finished = None, False
        try:
            try:
                self.client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            except Exception as e:  # noqa: BLE001 — a stream the server closed (it died): tritonclient's own error
                raise ClientError(f"cannot reach Triton at {self.url}: {e}") from None
            while True:
                try:
                    arrived, result, error = done.get(timeout=self.timeout)
                except queue.Empty:
                    raise ClientError(f"no response from {self.model!r} within {self.timeout:.0f} s") from None
                if error is not None:
                    raise ClientError(f"server error: {error.message() if hasattr(error, 'message') else error}")
                resp = result.get_response()
                for name in ("num_input_tokens", "num_output_tokens"):
                    n = result.as_numpy(name)
                    if n is not None and n.size:
                        counts[name] = int(n.reshape(-1)[0])
                lp, c = result.as_numpy("output_log_probs"), result.as_numpy("cum_log_probs")
                if log_probs is not None and lp is not None:
                    log_probs += lp.reshape(-1).tolist()
                if c is not None and c.size:
                    cum = float(c.reshape(-1)[0])
                text = result.as_numpy("text_output")
                if text is not None and text.size:
                    if ttft is None:
                        ttft = arrived - t0
                    chunk = text.reshape(-1)[0].decode("utf-8", "replace")
                    chunks.append(chunk)
                    times.append(arrived - t0)
                    ids = result.as_numpy("output_ids")
                    tokens += [] if ids is None else ids.reshape(-1).tolist()
                    if on_text:
                        on_text(chunk)
                if resp.parameters.get("triton_final_response") and resp.parameters["triton_final_response"].bool_param:
                    end, finished = arrived, True
                    break
        finally:
            if not (self.keep_stream and finished):  # after a failure a kept stream is not trusted again
                self.close()
        return Answer("".join(chunks), tokens, end - t0, ttft, chunks, times, counts, log_probs, cum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nvlm-client", description="Ask an NVLM deployment on Triton (gRPC).")
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--model", default="nvlm")
    ap.add_argument("--prompt", required=True, help="put <image> where each image belongs (else prepended)")
    ap.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=64)
    schema.add_flags(ap)  # one flag per decoding parameter of the request schema
    ap.add_argument("--stream", action="store_true", help="print text as tokens arrive")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        for img in args.image:
            if not Path(img).is_file():
                raise ClientError(f"image {img} not found")
        client = NVLMClient(args.url, args.model)
        client.check()
        printer = (lambda c: print(c, end="", flush=True)) if args.stream and not args.json else None
        ans = client.generate(args.prompt, args.image, max_tokens=args.max_tokens, stream=args.stream,
                              on_text=printer, **schema.from_flags(args))
    except NVLMError as e:
        print(f"nvlm-client: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(ans)))
    else:
        if not args.stream:
            print(ans.text)
        else:
            print()
        ttft = "-" if ans.time_to_first_token is None else f"{ans.time_to_first_token * 1e3:.0f} ms"
        print(f"[{len(ans.tokens)} tokens in {ans.seconds * 1e3:.0f} ms; time to first token {ttft}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
