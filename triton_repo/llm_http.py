"""The LLM link's second road: a request whose inputs are all scalars or 1-D lists goes to the LLM step over
Triton's HTTP `generate_stream` (server-sent events), read by one thread per process once per tick (HttpReader).

Why (issue 32): the `tensorrtllm` backend sends one response per decode step, so the entry model receives one
message per streamed token. Received over a `grpc.aio` stream, a message costs this process about 150 µs of CPU;
over this road about 60-70 µs, and tritonserver spends the same on them either way (benchmarks/link_floor.py,
docs/PERFORMANCE.md). The generate extension takes JSON only, and the bundled server
refuses a 2-D list ("Shape does not match true shape of 'data' field"), so requests that carry a prompt table,
encoder features, a cross-attention mask or stop/bad word lists keep the gRPC stream (llm_link.py).

Per request: one connection (a request per connection, as Triton's HTTP/1.1 streaming answers), `"id"` set to
the request id (so that `LLMLink.stop` names it), and the socket closed when the caller abandons the request
(Triton cancels a streaming HTTP request whose client went away). The events of one receive become one `JsonReply`
(a run of tokens); the end of the response body becomes the final, empty one, as
`triton_enable_empty_final_response` gives on the gRPC stream.

The server's HTTP address comes from NVLM_TRITON_HTTP_URL, which `nvlm-serve` and the GPU host's launch script set;
without it every request takes the gRPC stream.
"""

from __future__ import annotations

import collections
import json
import os
import re
import select
import selectors
import socket
import struct
import threading

import numpy as np

HTTP_URL_ENV = "NVLM_TRITON_HTTP_URL"
# how often the reader thread collects what has arrived (HttpReader says why not at each arrival)
READ_TICK_S = 0.01


def http_url() -> str | None:
    return os.environ.get(HTTP_URL_ENV) or None


def as_json(inputs: list) -> dict | None:
    """The request's (name, array with its batch dimension of 1) inputs as generate-extension JSON: a one-element
    input as a scalar, a 1-D one as a list. None when one cannot travel that way: a torch tensor (BF16 rows), an
    empty or a multi-dimensional input."""
    out = {}
    for name, value in inputs:
        if not isinstance(value, np.ndarray) or value.ndim == 0 or value.shape[0] != 1 or value.size == 0:
            return None
        row = value[0]
        if row.size == 1:
            out[name] = row.reshape(-1)[0].item()
        elif row.ndim == 1:
            out[name] = row.tolist()
        else:
            return None
    return out


class JsonReply:
    """LLM-step responses as events of the HTTP stream (the same reading interface as llm_link.Reply): the events
    that one receive brought, merged into one run of tokens, as the LLM step sends a run in one response when it is
    behind. Nothing else in an event is read."""

    __slots__ = ("id", "ids", "log_probs", "final")

    def __init__(self, request_id: str, body: dict | None, final: bool = False):
        self.id, self.final = request_id, final
        self.ids: list[int] | None = None if body is None else _flat(body.get("output_ids"))
        self.log_probs: list[float] | None = None if body is None else _flat(body.get("output_log_probs"))

    def extend(self, body: dict) -> None:
        """The next event's tokens (and log-probs) after these."""
        for name, value in (("ids", body.get("output_ids")), ("log_probs", body.get("output_log_probs"))):
            more = _flat(value)
            if more is not None:
                setattr(self, name, (getattr(self, name) or []) + more)

    def tokens(self) -> tuple[list[int], list[float] | None] | None:
        """The new tokens and their log-probs; None for the final, empty response of the stream."""
        return None if self.ids is None else (self.ids, self.log_probs)

    def as_numpy(self, name: str) -> np.ndarray | None:
        value = {"output_ids": self.ids, "output_log_probs": self.log_probs}.get(name)
        return None if value is None else np.asarray(value)


def _flat(value) -> list | None:
    """An output as the generate extension writes it (a scalar for one element, else a list, nested for more
    dimensions) → a flat list; None when absent."""
    if value is None:
        return None
    if not isinstance(value, list):
        return [value]
    while value and isinstance(value[0], list):
        value = [x for row in value for x in row]
    return value


# an event that carries tokens only, read without a JSON parse (json.loads was an eighth of the entry's CPU at c=32)
_TOKENS_ONLY = re.compile(rb'"output_ids":(\[[-0-9,]*\]|-?[0-9]+)[,}]')


def _parse(text: bytes) -> dict:
    if b'"error"' not in text and b"log_probs" not in text:
        m = _TOKENS_ONLY.search(text)
        if m is not None:
            value = m.group(1)
            return {"output_ids": [int(x) for x in value.strip(b"[]").split(b",") if x] if value[:1] == b"[" else
                    int(value)}
    return json.loads(text)


class _Response:
    """One request's connection and where its HTTP response has got to: the status line and headers, then the
    body (chunked, or of a given length), whose bytes are server-sent events."""

    __slots__ = ("sock", "rid", "inbox", "raw", "head", "chunked", "length", "events", "status", "ended")

    def __init__(self, sock: socket.socket, rid: str, inbox):
        self.sock, self.rid, self.inbox = sock, rid, inbox
        self.raw, self.events = bytearray(), bytearray()
        self.head, self.chunked, self.length, self.status, self.ended = False, False, 0, 0, False

    def feed(self, data: bytes) -> bool:
        """Take newly received bytes; deliver every complete event. True once the response has ended."""
        self.raw += data
        if not self.head:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(self.raw[:end]).decode("latin-1").split("\r\n")
            del self.raw[:end + 4]
            self.status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            self.length = int(headers.get("content-length", "0") or 0)
            self.head = True
        done = self._body()
        self._deliver(done)
        return done

    def _body(self) -> bool:
        if not self.chunked:
            if len(self.raw) < self.length:
                return False
            self.events += self.raw[:self.length] + b"\n\n"
            del self.raw[:]
            return True
        while True:  # chunk: size in hex, CRLF, the bytes, CRLF; a zero size ends the body
            eol = self.raw.find(b"\r\n")
            if eol < 0:
                return False
            size = int(bytes(self.raw[:eol]).split(b";")[0], 16)
            if size == 0:
                return True
            if len(self.raw) < eol + 2 + size + 2:
                return False
            self.events += self.raw[eol + 2:eol + 2 + size]
            del self.raw[:eol + 2 + size + 2]

    def _deliver(self, done: bool) -> None:
        *complete, rest = bytes(self.events).split(b"\n\n")
        self.events = bytearray(rest)
        run = None  # the events that arrived together, as one reply
        for event in complete:
            start = event.find(b"data:")
            text = (event[start + 5:] if start >= 0 else event).strip()
            if not text or self.ended:
                continue
            try:
                body = _parse(text)
            except ValueError:
                body = {"error": f"HTTP {self.status}: {text[:200].decode('utf-8', 'replace')}"}
            if "error" in body or self.status != 200:
                if run is not None:  # the tokens before it first
                    self.inbox.put((run, None))
                    run = None
                self.ended = True
                self.inbox.put((None, ValueError(body.get("error") or f"HTTP {self.status}")))
            elif run is None:
                run = JsonReply(self.rid, body)
            else:
                run.extend(body)
        if run is not None:
            self.inbox.put((run, None))
        if done and not self.ended:
            self.ended = True
            self.inbox.put((JsonReply(self.rid, None, final=True), None))


class HttpReader:
    """Every HTTP request of the process past its first event, read by one thread once per `tick` seconds.

    `open` connects, sends and reads up to the request's first event in the caller's thread: the first token
    reaches the worker without a hop through this thread. The connection is then handed over. This thread
    wakes once per tick, not once per arrival, and reads every connection that has something: a decode step
    sends each request one event, and woken per event the thread paid a wake-up and a GIL hand-over per token
    (issue 32). A late token waits at most a tick, well within the entry's stream interval, which holds tokens
    back for longer anyway; the end of a request is seen within a tick. `close` (any thread) drops a request:
    its socket is closed by this thread, which makes Triton cancel it."""

    def __init__(self, url: str, tick: float = READ_TICK_S):
        host, _, port = url.rpartition(":")
        self.url, self.address, self.tick = url, (host, int(port)), tick
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()  # wakes the idle thread (nothing registered) for an order
        self.orders: collections.deque = collections.deque()  # ("add" | "drop", _Response), from other threads
        self.thread = threading.Thread(target=self._loop, name="nvlm-llm-http", daemon=True)
        self.thread.start()

    def open(self, model: str, request_id: str, body: dict, inbox) -> _Response:
        """Send the request and read its response up to the first event (or its end) into `inbox`, then hand the
        connection to the reader thread. OSError: the server is unreachable (the caller says where)."""
        payload = json.dumps({"id": request_id, **body}).encode()
        sock = socket.create_connection(self.address, timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # closed with a reset, not a FIN: a connection per request would otherwise leave one socket in TIME_WAIT per
        # request for a minute, and short requests at hundreds per second run out of local ports
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"POST /v2/models/%s/generate_stream HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (model.encode(), self.address[0].encode(), len(payload), payload))
        sock.settimeout(None)  # the first token may wait for the engine's queue: as long as it takes
        resp = _Response(sock, request_id, inbox)
        while not inbox.items and not resp.ended:
            self._read(resp)
        if resp.ended:
            resp.sock.close()
        else:
            sock.setblocking(False)
            self._order("add", resp)
        return resp

    def close(self, resp: _Response) -> bool:
        """Drop `resp` (once per request); True if it had not ended (the LLM step may still be working on it)."""
        self._order("drop", resp)
        return not resp.ended

    def shutdown(self) -> None:
        self._order("stop", None)

    def _order(self, what: str, resp) -> None:
        self.orders.append((what, resp))
        try:
            self.wake_w.send(b"\0")
        except OSError:  # the reader is gone (shut down)
            pass

    def _loop(self) -> None:
        while True:
            # idle (nothing registered): sleep until an order comes; else one tick, orders wait for its end
            select.select([self.wake_r], [], [], None if not self.sel.get_map() else self.tick)
            try:
                self.wake_r.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            while self.orders:
                what, resp = self.orders.popleft()
                if what == "stop":
                    self.sel.close()
                    return
                if what == "add":
                    try:
                        self.sel.register(resp.sock, selectors.EVENT_READ, resp)
                    except (ValueError, OSError) as e:  # dropped (closed) before the reader took it
                        self._fail(resp, e)
                elif what == "drop":
                    self._end(resp)
            if self.sel.get_map():
                for key, _ in self.sel.select(0):
                    if self._read(key.data):
                        self._end(key.data)

    def _read(self, resp: _Response) -> bool:
        """One receive into `resp`; True once it has ended (its last event, or an error, delivered)."""
        try:
            data = resp.sock.recv(1 << 16)
        except BlockingIOError:
            return False
        except OSError as e:
            data, error = b"", e
        else:
            error = ConnectionError(f"the LLM step's HTTP stream at {self.url} ended before its last response")
        if not data:
            self._fail(resp, error)
            return True
        try:
            return resp.feed(data)
        except Exception as e:  # noqa: BLE001 — not the HTTP this reader speaks: this request fails, the thread goes on
            self._fail(resp, ValueError(f"unreadable response from the LLM step at {self.url}: {e!r}"))
            return True

    def _fail(self, resp: _Response, error: BaseException) -> None:
        if not resp.ended:
            resp.ended = True
            resp.inbox.put((None, error))

    def _end(self, resp: _Response) -> None:
        try:
            self.sel.unregister(resp.sock)
        except (KeyError, ValueError):  # never registered (dropped at once), or already gone
            pass
        resp.sock.close()
