"""The entry model's and the LLM step's logic without a Triton stub (triton_repo/serving_core.py): the tensors a
request's decoding parameters become, the answer built from the LLM step's responses (stop words, text, log-probs),
coalescing of a streamed run and cancellation — no server, no pb_utils."""

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from runtime.core import request_schema as schema
from runtime.core.errors import InputError
from triton_repo.serving_core import AnswerStream, PendingRun, entry_decoding, watch


class Letters:
    """A tokenizer whose token i is the letter chr(97 + i): decode and encode are exact inverses."""

    vocab_size = 26

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)

    def encode(self, text):
        return [ord(c) - 97 for c in text if c != " "]


TOK = Letters()


def _entry(values, max_tokens=16):
    sent = schema.client_tensors(values)
    return entry_decoding(lambda n: sent[n][1] if n in sent else None, max_tokens, TOK.encode, end_id=25)


def test_entry_decoding_sends_what_was_asked_under_nvidia_names():
    d = _entry({"temperature": 0.5, "stop_words": ("cd",), "repetition_penalty": 1.5, "return_log_probs": True})
    sends = dict(d.sends)
    assert sends["temperature"].tolist() == [0.5] and sends["end_id"].tolist() == [25]
    assert sends["repetition_penalty"].tolist() == [1.5] and "presence_penalty" not in sends
    assert sends["stop_words_list"].tolist() == [[2, 3], [2, -1]]  # "cd" alone (the spaced variant tokenizes alike)
    assert d.stop_words == ((2, 3),) and d.log_probs and d.outputs == ["output_ids", "output_log_probs"]
    plain = _entry({})
    assert "stop_words_list" not in dict(plain.sends) and plain.outputs == ["output_ids"]
    with pytest.raises(InputError, match="min_tokens"):
        _entry({"min_tokens": 17})


def _groups(tokens, sizes):
    """The LLM step's responses, grouped as they arrive: (tokens, log-probs) per response; log-prob of token t is
    −t/10, so a misaligned log-prob is visible."""
    out, i = [], 0
    for size in sizes:
        group = []
        for n in size:
            chunk = tokens[i:i + n]
            group.append((chunk, [-t / 10 for t in chunk]))
            i += n
        out.append(group)
    return out


def test_a_streamed_answer_holds_back_a_stop_word_split_across_responses_and_drops_it():
    d = _entry({"stop_words": ("cd",), "return_log_probs": True})
    answer = AnswerStream(TOK, d)
    # a, b, c | d(stop) — "c" arrives in one response, "d" in the next group
    pieces = [answer.push(g, render=True) for g in _groups([0, 1, 2, 3], [[1, 2], [1]])]
    last = answer.finish_stream()
    ids = [t for p in pieces + [last] if p for t in p.ids]
    assert ids == [0, 1] and "".join(p.text for p in pieces + [last]) == "ab"
    assert pieces[0].ids == [0, 1]  # "c" held: it may begin the stop word
    assert [lp for p in pieces + [last] for lp in p.log_probs] == [0.0, -0.1]
    assert last.cum == pytest.approx(-0.1)


def test_held_tokens_that_were_not_a_stop_word_come_out_at_the_end():
    d = _entry({"stop_words": ("cd",), "return_log_probs": True})
    stream, whole = AnswerStream(TOK, d), AnswerStream(TOK, d)
    groups = _groups([4, 2], [[1], [1]])  # e, c — the answer ends on a possible stop word's start
    pieces = [stream.push(g, render=True) for g in groups]
    for g in groups:
        whole.push(g, render=False)
    last = stream.finish_stream()
    assert [t for p in pieces for t in p.ids] == [4] and last.ids == [2] and last.text == "c"
    # the entry sends the last run and the held tail as one final response (Piece.then)
    both = pieces[-1].then(last) if pieces[-1] is not None else last
    assert both.ids == [2] and both.text == "c" and both.cum == last.cum
    one = pieces[0].then(last)
    assert (one.ids, one.text, one.log_probs, one.cum) == ([4, 2], "ec", pieces[0].log_probs + last.log_probs, last.cum)
    done = whole.finish()
    assert done.ids == [4, 2] and done.log_probs == [-0.4, -0.2] and done.cum == pytest.approx(-0.6)


def test_text_deltas_add_up_to_the_full_decode_and_groups_without_tokens_send_nothing():
    answer = AnswerStream(TOK, _entry({}))
    tokens = [7, 4, 11, 11, 14]
    pieces = [answer.push(g, render=True) for g in _groups(tokens, [[2], [1, 1], [], [1]])]
    assert pieces[2] is None
    assert "".join(p.text for p in pieces if p) + answer.finish_stream().text == "hello"
    assert answer.tokens == tokens


def test_a_pending_run_leaves_as_one_response_when_the_sender_is_behind():
    queued, sent = [], []
    run = PendingRun(queued.append, lambda tokens, lps, cum: sent.append((tokens, lps, cum)))
    for t in (5, 6, 7):
        run.push(t, -1.0)
    assert len(queued) == 1  # enqueued once, at the run's first token
    queued[0]()
    assert sent == [([5, 6, 7], [-1.0, -1.0, -1.0], -3.0)]
    run.push(8, -0.5)
    queued[1]()
    assert sent[-1] == ([8], [-0.5], -3.5)  # the cumulative log-prob runs on


def test_watch_stops_a_request_whose_client_left():
    fut, flag = Future(), threading.Event()
    gone = iter([False, False, True])

    def is_cancelled():
        answer = next(gone, True)
        if answer:  # the executor notices the flag and ends the request
            threading.Timer(0.01, lambda: fut.set_result("stopped")).start()
        return answer

    assert watch(fut, is_cancelled, flag, period=0.001) == "stopped" and flag.is_set()


def test_words_reach_the_llm_step_in_trtllm_layout():
    d = _entry({"bad_words": ("ab", "e")})
    words = dict(d.sends)["bad_words_list"]
    assert words.dtype == np.int32 and words.tolist() == [[0, 1, 4], [2, 3, -1]]


def test_the_null_engine_returns_seeded_tokens_of_the_requested_length():
    """The benchmark's null engine (models/llm_step.NullBatcher): no model, a fixed token sequence per seed, exactly
    the requested length, never the end id, every token through on_token in order; a cancelled request stops."""
    from runtime.core.request_schema import Controls
    from runtime.executor import Request
    from triton_repo.models.llm_step import NullBatcher

    engine = NullBatcher(vocab=50, run=3, step_s=0.0)
    try:
        seen = []
        a = engine.submit(Request([1, 2], 40, controls=Controls(seed=5, end_id=7, return_log_probs=True)),
                          lambda t, lp: seen.append((t, lp))).result(timeout=30)
        b = engine.submit(Request([1, 2], 40, controls=Controls(seed=5, end_id=7))).result(timeout=30)
        c = engine.submit(Request([1, 2], 40, controls=Controls(seed=6, end_id=7))).result(timeout=30)
        assert len(a.tokens) == 40 and a.tokens == b.tokens != c.tokens and 7 not in a.tokens
        assert [t for t, _ in seen] == a.tokens and a.log_probs == [-1.0] * 40 and b.log_probs is None
        assert a.finish_reason == "length"
        stop = threading.Event()
        stop.set()
        d = engine.submit(Request([1], 1000, controls=Controls(seed=1), cancelled=stop.is_set)).result(timeout=30)
        assert d.finish_reason == "cancelled" and len(d.tokens) < 1000
    finally:
        engine.close()


def _chunk(payload: bytes) -> bytes:
    """One chunk of an HTTP/1.1 chunked body, as Triton's generate_stream sends each server-sent event."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _close_after_client(conn) -> None:
    """Keep a test server's connection open until the client closes it (with a reset: SO_LINGER 0), then close."""
    try:
        conn.recv(1)
    except OSError:
        pass
    conn.close()


def _until(cond, seconds=30.0):
    import time

    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_a_streamed_run_waits_for_its_interval_and_the_final_response_flushes_it_first():
    """After a request's first token (sent at once), its tokens leave in runs at most once per stream interval;
    the final response sends a waiting run before itself, and the run's delayed send then finds nothing."""
    import time

    from triton_repo.serving_core import Outbox

    outbox, sent = Outbox(), []
    run = PendingRun(outbox.put, lambda tokens, lps, cum: sent.append(list(tokens)), interval=0.5,
                     enqueue_at=outbox.put_at)
    try:
        run.push(1, None)
        assert _until(lambda: sent == [[1]])
        run.push(2, None)
        run.push(3, None)
        time.sleep(0.05)
        assert sent == [[1]]  # within the interval: held
        outbox.put(lambda: (run.flush(), sent.append("final")))
        assert _until(lambda: sent == [[1], [2, 3], "final"])
        time.sleep(0.6)
        assert sent == [[1], [2, 3], "final"]  # the delayed send found the run gone
        run.push(4, None)  # more than the interval after the last run: at once
        assert _until(lambda: sent[-1] == [4], 0.4)
    finally:
        outbox.close()


def test_only_scalar_and_one_dimensional_requests_take_the_http_road():
    """llm_http.as_json: a text request's tensors become generate-extension JSON (one element: a scalar, 1-D: a
    list, batch dimension dropped); a 2-D input (stop words, the cross-attention mask), an empty one or a torch
    tensor (a BF16 prompt table) sends the whole request over gRPC instead."""
    import torch

    from triton_repo.llm_http import as_json

    text = [("input_ids", np.asarray([[5, 6, 7]], np.int32)), ("input_lengths", np.asarray([[3]], np.int32)),
            ("streaming", np.asarray([[True]])), ("seed", np.asarray([[2**63 + 1]], np.uint64)),
            ("temperature", np.asarray([[0.5]], np.float32))]
    assert as_json(text) == {"input_ids": [5, 6, 7], "input_lengths": 3, "streaming": True, "seed": 2**63 + 1,
                             "temperature": 0.5}
    assert as_json(text + [("stop_words_list", np.asarray([[[1, 2], [2, -1]]], np.int32))]) is None
    assert as_json(text + [("bad_words_list", np.zeros((1, 2, 0), np.int32))]) is None
    assert as_json(text + [("prompt_embedding_table", torch.zeros(1, 4, 8, dtype=torch.bfloat16))]) is None


def test_the_http_reader_survives_a_garbled_response_and_reads_the_next():
    """llm_http.HttpReader against a local socket that answers garbage first, then proper generate_stream responses:
    the first request fails with an error (its worker is not left waiting), the reader thread lives on, and the next
    requests' tokens arrive in order, then their final marker — events that arrived apart as replies of their own
    (the first one read by the caller's thread, the next by the reader's), events that arrived together as one run."""
    import socket
    import time

    from triton_repo.llm_http import HttpReader
    from triton_repo.llm_link import _Inbox

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = [_chunk(e) for e in
              (b'data: {"output_ids":[5,6]}\n\n', b'data: {"id":"r","output_ids":7,"sequence_length":1}\n\n')]
    apart = [head + events[0], events[1] + b"0\r\n\r\n"]
    together = [head + b"".join(events) + b"0\r\n\r\n"]

    def serve():
        for parts in ([b"garbage without a status line\r\n\r\n"], apart, together):
            conn, _ = listener.accept()
            conn.recv(65536)
            for part in parts:
                conn.sendall(part)
                time.sleep(0.05)  # longer than the reader's tick: the next part is a receive of its own
            _close_after_client(conn)

    threading.Thread(target=serve, daemon=True).start()
    reader = HttpReader(f"127.0.0.1:{port}")
    try:
        bad = _Inbox()
        reader.open("m", "r1", {"input_ids": [1]}, bad)
        assert _until(lambda: bad.items)
        reply, error = bad.items.popleft()
        assert reply is None and "unreadable response" in str(error)
        for rid, runs in (("r2", [[5, 6], [7]]), ("r3", [[5, 6, 7]])):
            ok = _Inbox()
            reader.open("m", rid, {"input_ids": [1]}, ok)
            assert ok.items  # the first event, read before open returned
            assert _until(lambda: len(ok.items) == len(runs) + 1)
            got = [r for r, e in ok.items]
            assert [r.tokens() for r in got[:-1]] == [(run, None) for run in runs]
            assert got[-1].final and got[-1].tokens() is None and got[0].id == rid
    finally:
        reader.shutdown()
        listener.close()


def test_an_http_stream_read_in_any_pieces_gives_every_token_in_order_once():
    """llm_http._Response: a chunked server-sent-event stream, received in random pieces, delivers every token in
    order and the end once, whether its events are read in one pass (token-only events) or one by one (events with
    log-probs, nested lists, an event without tokens). Fresh random streams; the expected tokens differ per event."""
    import json
    import random

    from triton_repo.llm_http import _Response
    from triton_repo.llm_link import _Inbox

    rng = random.Random(1234)
    for trial in range(60):
        want_ids, events = [], []
        for _ in range(rng.randint(1, 12)):
            ids = [rng.randint(0, 70000) for _ in range(rng.randint(0, 4))]
            body = {"id": "r", "model_name": "tensorrt_llm", "model_version": "1", "sequence_length": 1}
            form = rng.choice(["list", "scalar", "nested", "log_probs", "none"] if trial % 2 else ["list", "scalar"])
            if form == "none":
                ids = []
            elif form == "scalar" or (len(ids) == 1 and form == "list"):
                ids = ids[:1] or [rng.randint(0, 9)]
                body["output_ids"] = ids[0]
            elif form == "nested":
                body["output_ids"] = [ids]
            else:
                body["output_ids"] = ids
            if form == "log_probs":
                lps = [round(rng.uniform(-5, 0), 3) for _ in ids]
                body["output_log_probs"] = lps
            want_ids += ids
            events.append(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")
        stream = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        stream += b"".join(_chunk(e) for e in events) + b"0\r\n\r\n"
        inbox = _Inbox()
        resp = _Response(None, "r", inbox)
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, min(8, len(stream) - 1))))
        pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        fed = 0
        while not resp.feed(pieces[fed]):  # the reader stops at the end (the zero-size chunk's first line)
            fed += 1
        assert b"".join(pieces[fed + 1:]) in (b"", b"\r\n", b"\n")  # nothing but the terminator's last bytes left
        got = [reply for reply, error in inbox.items]
        assert all(error is None for _, error in inbox.items)
        assert got[-1].final and not any(r.final for r in got[:-1])
        assert [t for r in got[:-1] for t in r.ids or []] == want_ids, trial


def test_a_paced_http_request_is_read_when_taken_and_its_end_wakes_the_taker():
    """llm_http.HttpReader.watch / pull through llm_link.Call: once `paced`, a request's events are read by `take`
    (those that arrived apart in one run), not by the reader thread; a server that closes the connection after the
    response wakes the taker from the reader's thread before anyone reads the end, and the next `take` has the last
    run and the final reply; a server that keeps the connection open still ends the request at the next `take`;
    a request that ended before it was paced wakes at once; a server that goes away mid-response wakes the taker,
    whose next `take` raises."""
    import socket

    from triton_repo.llm_http import HttpReader
    from triton_repo.llm_link import Call, LLMLink, _Inbox

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    link = LLMLink("m", url="127.0.0.1:1", http="")  # for its reading of replies only: nothing is sent through it

    def event(body: bytes) -> bytes:
        return _chunk(b"data: " + body + b"\n\n")

    go = [threading.Event() for _ in range(4)]

    def serve():
        for k, closes in enumerate((True, False, True, True)):
            conn, _ = listener.accept()
            assert b"Connection: close" in conn.recv(65536)
            if k == 2:  # the whole response at once, ended before the caller paces it
                conn.sendall(head + event(b'{"output_ids":1}') + b"0\r\n\r\n")
            elif k == 3:  # a token, then the server goes away without ending the response
                conn.sendall(head + event(b'{"output_ids":1}'))
                go[k].wait(10)
                conn.sendall(event(b'{"output_ids":2}'))
            else:
                conn.sendall(head + event(b'{"output_ids":1}'))
                go[k].wait(10)
                for tok in (2, 3):
                    conn.sendall(event(b'{"output_ids":%d}' % tok))
                    time.sleep(0.03)
                conn.sendall(event(b'{"output_ids":4}') + b"0\r\n\r\n")
            if closes:
                conn.close()
            else:
                _close_after_client(conn)

    threading.Thread(target=serve, daemon=True).start()
    reader = HttpReader(f"127.0.0.1:{port}")
    try:
        for k, rid in enumerate(("closes", "stays-open", "ended-first", "dies")):
            inbox = _Inbox()
            resp = reader.open("m", rid, {"input_ids": [1]}, inbox)
            call = Call(link, rid, inbox, lambda: reader.close(resp), http=(reader, resp))
            assert call.first().tokens() == ([1], None)
            woken = []
            call.paced(lambda: woken.append((threading.current_thread().name, len(inbox.items))))
            if k == 2:
                assert woken and call.take()[-1].final
                continue
            time.sleep(0.05)  # the reader thread has taken the order: from now on it does not read this request
            go[k].set()
            if k == 3:
                assert _until(lambda: woken, seconds=5) and woken[0][0] == "nvlm-llm-http"
                with pytest.raises(ValueError, match="ended before its last response"):
                    call.take()
                continue
            time.sleep(0.25)  # every event has arrived
            assert not inbox.items  # nobody read them
            if k == 0:  # the server closed: the taker was woken by the reader thread, before any read
                assert woken == [("nvlm-llm-http", 0)]
            else:
                assert not woken
            got = call.take()
            assert [r.tokens() for r in got[:-1]] == [([2, 3, 4], None)] and got[-1].final and got[-1].id == rid
            assert not call.take()
    finally:
        reader.shutdown()
        listener.close()


def test_the_pacer_gives_turns_when_due_or_woken_until_the_end_and_survives_a_failing_one():
    """pacer.Pacer: every request handed over gets turns from one thread, each no sooner than the time its last turn
    asked for (and rounds at least a tick apart), until its turn says it ended; a woken request gets its turn at the
    next round, long before it is due; a request whose turn raises is dropped and the others go on; with nothing in
    hand the pacer sleeps, and a request added then gets its turn when due."""
    from triton_repo.pacer import Pacer

    tick, every = 0.002, 0.03

    class Job:
        def __init__(self, ends_after, fails=False):
            self.ends_after, self.fails, self.turns, self.asked, self.threads = ends_after, fails, [], [], set()

        def pump(self, now):
            self.turns.append(time.monotonic())
            self.threads.add(threading.get_ident())
            if self.fails:
                raise RuntimeError("a bug in one request")
            if len(self.turns) >= self.ends_after:
                return None
            self.asked.append(now + every)
            return self.asked[-1]

    pacer = Pacer(tick=tick)
    try:
        short, long, bad = Job(3), Job(6), Job(1, fails=True)
        t0 = time.monotonic()
        for job in (short, long, bad):
            pacer.add(job, t0 + every)
        assert _until(lambda: len(long.turns) == 6)
        time.sleep(3 * every)
        assert len(short.turns) == 3 and len(long.turns) == 6 and len(bad.turns) == 1  # none after its end
        assert min(short.turns + long.turns + bad.turns) >= t0 + every  # not before its first due time
        for job in (short, long):  # each later turn no sooner than the time the one before asked for
            assert all(turn >= asked for turn, asked in zip(job.turns[1:], job.asked))
        assert len(short.threads | long.threads | bad.threads) == 1
        # idle now; a job due in a long while, woken: its turn comes at the next round, not when due
        sleepy = Job(2)
        pacer.add(sleepy, time.monotonic() + 60)
        time.sleep(5 * tick)
        assert not sleepy.turns
        woken_at = time.monotonic()
        pacer.wake(sleepy)
        assert _until(lambda: sleepy.turns, seconds=5) and sleepy.turns[0] - woken_at < 1.0
        pacer.wake(bad)  # no longer in hand: ignored
        late = Job(1)
        pacer.add(late, time.monotonic())
        assert _until(lambda: late.turns)
    finally:
        pacer.close()
    assert not pacer.thread.is_alive()
