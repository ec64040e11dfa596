"""The LLM link's second road: a request whose inputs are all scalars or 1-D lists goes to the LLM step over
Triton's HTTP `generate_stream` (server-sent events). Past its first event a request is read either by one thread
per process once per tick, or by whoever takes its responses when it takes them (HttpReader says when which).

Why (issue 32): the `tensorrtllm` backend sends one response per decode step, so the entry model receives one
message per streamed token. Received over a `grpc.aio` stream, a message costs this process about 150 µs of CPU;
over this road about 60-70 µs, and tritonserver spends the same on them either way (benchmarks/link_floor.py,
docs/PERFORMANCE.md). The generate extension takes JSON only, and the bundled server
refuses a 2-D list ("Shape does not match true shape of 'data' field"), so requests that carry a prompt table,
encoder features, a cross-attention mask or stop/bad word lists keep the gRPC stream (llm_link.py).

Per request: one connection (a request per connection, as Triton's HTTP/1.1 streaming answers), asked to close
once the response has ended (`Connection: close`: the end shows as the server's half-close, which the reader
thread is told of by epoll without reading), `"id"` set to the request id (so that `LLMLink.stop` names it), and
the socket closed when the caller abandons the request (Triton cancels a streaming HTTP request whose client went
away). The events of one receive become one `JsonReply`
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
READ_SIZE = 1 << 16  # bytes asked of one receive


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


# every token of a run of token-only events, in one pass: the numbers inside `"output_ids":` (a list or a scalar)
_TOKENS_IN_RUN = re.compile(rb'"output_ids":\[?([-0-9,]*)\]?[,}]')
# the end of a complete event in a chunked body: the event's blank line, then the chunk's CRLF
_EVENT_END = b"\n\n\r\n"


class _Response:
    """One request's connection and where its HTTP response has got to: the status line and headers, then the
    body (chunked, or of a given length), whose bytes are server-sent events."""

    __slots__ = ("sock", "rid", "inbox", "raw", "head", "chunked", "length", "events", "status", "ended", "lock",
                 "on_close", "closing")

    def __init__(self, sock: socket.socket, rid: str, inbox):
        self.sock, self.rid, self.inbox = sock, rid, inbox
        self.raw, self.events = bytearray(), bytearray()
        self.head, self.chunked, self.length, self.status, self.ended = False, False, 0, 0, False
        # one reader at a time: the reader thread and a puller may both read a request while it changes hands
        self.lock = threading.Lock()
        self.on_close = None  # a pulled request's end, noticed by the reader thread (HttpReader.watch)
        self.closing = False  # the server has closed its side: a pull reads to the end

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
        if self.chunked and not self.events and self._run():
            return self.ended
        done = self._body()
        self._deliver(done)
        return done

    def _run(self) -> bool:
        """The common case at a read, in one pass over the bytes: every complete event carries tokens only (each
        chunk of Triton's stream is one event `data: {...}`). They become one run; the body's last chunk, if it
        came, ends the response. False: not that case, nothing was taken (the event-by-event reading follows).
        A pulled request's read brings an interval's events: one regular expression and one `json.loads` for all of
        them instead of a Python loop over each (issue 32)."""
        raw = self.raw
        end = raw.rfind(_EVENT_END) + len(_EVENT_END)
        if end < len(_EVENT_END) or self.status != 200:
            return False
        region = bytes(raw[:end])
        if b'"error"' in region or b"log_probs" in region:
            return False
        found = _TOKENS_IN_RUN.findall(region)
        if len(found) != region.count(b"data:"):
            return False  # an event without output_ids, or not in the form this pass reads
        del raw[:end]
        ids = json.loads(b"[%s]" % b",".join(f for f in found if f))
        self.inbox.put((JsonReply(self.rid, {"output_ids": ids}), None))
        if raw.startswith(b"0\r\n"):  # the zero-size chunk: the body has ended
            self.ended = True
            self.inbox.put((JsonReply(self.rid, None, final=True), None))
        return True

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
    """Every HTTP request of the process past its first event, read by one thread once per `tick` seconds, or
    pulled by the thread that takes its responses.

    `open` connects, sends and reads up to the request's first event in the caller's thread: the first token
    reaches the worker without a hop through this thread. The connection is then handed over. This thread
    wakes once per tick, not once per arrival, and reads every connection that has something: a decode step
    sends each request one event, and woken per event the thread paid a wake-up and a GIL hand-over per token
    (issue 32). A late token waits at most a tick, well within the entry's stream interval, which holds tokens
    back for longer anyway; the end of a request is seen within a tick.

    `watch` turns a request into a pulled one (the entry's pacer: it sends a run once per stream interval):
    this thread stops reading it and only waits, in epoll, for the server's half-close at the end of the
    response, then calls the request's `on_close`; the taker reads what has arrived with `pull` when it takes
    it. Read per tick, a request's tokens took a receive each at 10 ms decode steps; pulled at its turn, a
    receive brings the interval's run. (Issue 32: this thread was a fifth of the entry's CPU at 32 streams; pulled,
    most of that moved to the taker, since the cost is per event more than per receive: 0.97× of the entry's CPU
    per token in all, docs/PERFORMANCE.md.) A server that does not close after the response still ends the
    request: the taker's next `pull` reads its last chunk.

    `close` (any thread) drops a request: its socket is closed by this thread, which makes Triton cancel it."""

    def __init__(self, url: str, tick: float = READ_TICK_S):
        host, _, port = url.rpartition(":")
        self.url, self.address, self.tick = url, (host, int(port)), tick
        self.sel = selectors.DefaultSelector()  # the requests read here, once per tick
        self.wake_r, self.wake_w = socket.socketpair()  # wakes the thread for an order
        # the requests pulled by their takers: fd → request, watched for the server's half-close only
        self.ends = select.epoll()
        self.ends.register(self.wake_r.fileno(), select.EPOLLIN)
        self.watched: dict[int, _Response] = {}
        self.orders: collections.deque = collections.deque()  # ("add" | "watch" | "drop", _Response), other threads
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
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                     % (model.encode(), self.address[0].encode(), len(payload), payload))
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

    def watch(self, resp: _Response, on_close) -> None:
        """From now on `resp` is read by its taker (`pull`), not by this thread, which calls `on_close()` when the
        server closes the connection (the response has ended, or the server is gone): the taker's next `pull`
        reads the end. `on_close` must be quick; it may come after the taker has read the end itself."""
        resp.on_close = on_close
        self._order("watch", resp)

    def pull(self, resp: _Response) -> None:
        """Read what has arrived for `resp` into its inbox, without waiting (the taker's thread)."""
        with resp.lock:
            while not resp.ended:
                got = self._read(resp)
                if got is not True and (got == 0 or got < READ_SIZE and not resp.closing):
                    break  # no more for now (a short read: saves a receive that would find nothing)
        if resp.ended:
            self._order("drop", resp)

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
        wake = self.wake_r.fileno()
        while True:
            # nothing read here: sleep until an order or a watched request's end; else one tick, orders wait for
            # its end, a watched request's end does not
            for fd, _ in self.ends.poll(self.tick if self.sel.get_map() else None):
                if fd == wake:
                    try:
                        self.wake_r.recv(4096, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        pass
                elif (resp := self.watched.pop(fd, None)) is not None:
                    self.ends.unregister(fd)  # level-triggered: once is enough; the taker reads the rest
                    resp.closing = True
                    resp.on_close()
            while self.orders:
                what, resp = self.orders.popleft()
                if what == "stop":
                    self.sel.close()
                    self.ends.close()
                    return
                if what == "add":
                    try:
                        self.sel.register(resp.sock, selectors.EVENT_READ, resp)
                    except (ValueError, OSError) as e:  # dropped (closed) before the reader took it
                        self._fail(resp, e)
                elif what == "watch":
                    self._watch(resp)
                elif what == "drop":
                    self._end(resp)
            if self.sel.get_map():
                for key, _ in self.sel.select(0):
                    resp = key.data
                    with resp.lock:
                        got = self._read(resp)
                    if got is True:
                        self._end(resp)

    def _watch(self, resp: _Response) -> None:
        try:
            self.sel.unregister(resp.sock)
        except (KeyError, ValueError):  # ended and closed already
            return
        if resp.ended:  # read to its end here before the order came: its taker finds the end in the inbox
            resp.sock.close()
            return
        fd = resp.sock.fileno()
        self.watched[fd] = resp
        self.ends.register(fd, select.EPOLLRDHUP)

    def _read(self, resp: _Response) -> bool | int:
        """One receive into `resp` (the caller holds its lock): True once it has ended (its last event, or an error,
        delivered), else how many bytes came."""
        try:
            data = resp.sock.recv(READ_SIZE)
        except BlockingIOError:
            return 0
        except OSError as e:
            data, error = b"", e
        else:
            error = ConnectionError(f"the LLM step's HTTP stream at {self.url} ended before its last response")
        if not data:
            self._fail(resp, error)
            return True
        try:
            return resp.feed(data) or len(data)
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
        except (KeyError, ValueError):  # never registered (dropped at once), watched, or already gone
            pass
        fd = resp.sock.fileno()
        if fd >= 0 and self.watched.pop(fd, None) is not None:
            self.ends.unregister(fd)
        resp.sock.close()
