"""The reference LLM step's streaming path in-process (no tritonserver): a streamed request's tokens leave in
runs when the sending thread falls behind, the request's own thread watches for a client that left, and the
entry model's link groups the responses that arrived together."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.core.request_schema import Controls
from runtime.executor import Request
from triton_repo import serving
from triton_repo.llm_link import FINAL, LLMLink, _Inbox, _Shared

FINAL_FLAG = 1


class _Tensor:
    def __init__(self, name, array):
        self._name, self.array = name, np.asarray(array)

    def name(self):
        return self._name


_PB = SimpleNamespace(Tensor=_Tensor, InferenceResponse=lambda output_tensors: output_tensors,
                      TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL_FLAG)


class _Sender:
    """Records (tokens, log-probs, cum, flags) per response."""

    def __init__(self):
        self.sent, self.done = [], threading.Event()

    def send(self, response=None, flags=0):
        t = {x.name(): x.array for x in response or []}
        ids = t["output_ids"].reshape(-1).tolist() if "output_ids" in t else None
        self.sent.append((ids, t.get("output_log_probs"), t.get("cum_log_probs"), flags))
        if flags & FINAL_FLAG:
            self.done.set()


@pytest.fixture(scope="module")
def llm_step(serve_build):
    model = serving.ReferenceLLMModel()
    model._setup(serve_build)
    yield model
    model.finalize()


def _job(n, *, log_probs=False, is_cancelled=lambda: False):
    flag = threading.Event()
    req = Request([3, 17, 42, 9, 77], n, controls=Controls(min_tokens=n, return_log_probs=log_probs), cancelled=flag.is_set)
    return (req, True, "", {"output_ids", "output_log_probs", "cum_log_probs"}, flag, is_cancelled)


def _run(model, job, sender):
    """As `execute` does: the request submitted to the batcher here, then waited for on a thread of its own."""
    started = model._start(job, sender, _PB)
    threading.Thread(target=model._run, args=(job, started, sender, _PB), daemon=True).start()
    assert sender.done.wait(60)


def test_a_streamed_request_s_tokens_leave_as_one_run_while_the_sender_is_behind(llm_step):
    """Tokens made while the sending thread is busy leave together in its next response, in order, with the
    cumulative log-prob up to the run's last token; the same request sent promptly gives the same tokens.
    The sending thread is held by a send queued ahead of the request (not by timing: how many tokens the
    batcher makes before a free sender takes the first run depends on the machine's load)."""
    n = 8
    free = _Sender()
    _run(llm_step, _job(n, log_probs=True), free)
    hold, busy = threading.Event(), threading.Event()
    llm_step.outbox.put(lambda: (busy.set(), hold.wait(30)))  # the sender is busy with an earlier response
    assert busy.wait(30)  # taken off the queue: what is queued from now on is this request's
    outbox = llm_step.outbox

    def release():  # once the run's send and the final one wait behind it: every token has been made
        deadline = time.monotonic() + 30
        while len(outbox.ready) < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        hold.set()

    threading.Thread(target=release, daemon=True).start()
    behind = _Sender()
    _run(llm_step, _job(n, log_probs=True), behind)

    def tokens(sent):
        return [t for ids, *_ in sent if ids for t in ids]

    assert len(tokens(free.sent)) == n and tokens(behind.sent) == tokens(free.sent)
    assert [len(ids) for ids, *_ in behind.sent if ids] == [n]  # one response for every token, then the final
    assert len(behind.sent) == 2 and behind.sent[-1][3] == FINAL_FLAG and behind.sent[-1][0] is None
    _, lps, cum, _ = behind.sent[0]
    free_lps = np.concatenate([lp.reshape(-1) for ids, lp, *_ in free.sent if ids])
    assert lps.shape == (1, 1, n) and np.all(lps <= 0)
    np.testing.assert_allclose(lps.reshape(-1), free_lps, atol=1e-5)
    assert float(cum.reshape(-1)[0]) == pytest.approx(float(lps.sum()), abs=1e-4)


def test_the_request_s_own_thread_stops_it_when_its_client_left(llm_step):
    """`is_cancelled` (a round trip to tritonserver) is asked by the request's thread, not by the batcher's
    loop; a yes sets the stop flag and the request ends early. A client that stays gets every token."""
    asked = []
    left = _Sender()

    def gone_once_a_token_came():  # not after a time: under load the prompt alone may take longer
        asked.append(threading.get_ident())
        return any(ids for ids, *_ in left.sent)

    n = 400  # long enough that the watch (every 10 ms) sees the client leave before the end
    job = _job(n, is_cancelled=gone_once_a_token_came)
    _run(llm_step, job, left)
    got = [t for ids, *_ in left.sent if ids for t in ids]
    assert job[4].is_set() and 0 < len(got) < n
    assert llm_step.batcher._thread.ident not in set(asked)
    stays = _Sender()
    _run(llm_step, _job(12), stays)
    assert len([t for ids, *_ in stays.sent if ids for t in ids]) == 12


def _message(rid, final=False, error=""):
    """A ModelStreamInferResponse as the LLM step's server sends it."""
    from tritonclient.grpc import service_pb2

    msg = service_pb2.ModelStreamInferResponse(error_message=error)
    msg.infer_response.id = rid
    msg.infer_response.outputs.add(name="output_ids", datatype="INT32", shape=[1, 1])
    msg.infer_response.raw_output_contents.append(np.asarray([[len(rid)]], np.int32).tobytes())
    if final:
        msg.infer_response.parameters[FINAL].bool_param = True
    return msg


def _link_with(arrived):
    """An LLMLink whose request finds `arrived` (what gRPC delivered, routed by the link's own reader) already in
    its queue, and whose send goes nowhere."""
    link, shared = LLMLink(url="unused:0"), _Shared.__new__(_Shared)
    shared.waiting, shared.dead = {}, None

    def send(rid, msg):
        inbox = shared.waiting[rid] = _Inbox()
        for m in arrived:
            link._deliver(shared, m)
        return shared, inbox

    link._send = send
    return link


def test_the_link_groups_the_responses_that_arrived_together():
    """grouped=True yields every response already there as one list (the final one ends it); without it, one
    response at a time, as before."""
    arrived = [_message("r"), _message("r"), _message("r"), _message("r", final=True)]
    groups = list(_link_with(arrived).generate([], ["output_ids"], "r", grouped=True))
    assert [len(g) for g in groups] == [4] and [g.msg for g in groups[0]] == [m.infer_response for m in arrived]
    single = list(_link_with(arrived).generate([], ["output_ids"], "r"))
    assert [r.msg for r in single] == [m.infer_response for m in arrived]
    assert single[0].as_numpy("output_ids").tolist() == [[1]] and single[0].as_numpy("output_log_probs") is None


def test_the_shared_stream_routes_each_response_to_its_own_request():
    """One stream carries every request: a response goes to the queue of the request it names, another request's
    (or an abandoned one's) never reaches it, and an error response ends its request with the LLM step's message."""
    mixed = [_message("other"), _message("r"), _message("gone", final=True), _message("other", final=True),
             _message("r", final=True)]
    got = list(_link_with(mixed).generate([], ["output_ids"], "r"))
    assert [r.id for r in got] == ["r", "r"] and got[-1].final
    with pytest.raises(ValueError, match="engine on fire"):
        list(_link_with([_message("x"), _message("r", error="engine on fire")]).generate([], ["output_ids"], "r"))


def test_a_run_waits_for_its_interval_but_the_last_response_does_not():
    """grouped with an interval: the first response leaves at once; those that arrive within the interval leave
    together when it ends (the worker is not woken for each); the request's final response ends the wait at once
    instead of at the interval's end."""
    link, shared = LLMLink(url="unused:0"), _Shared.__new__(_Shared)
    shared.waiting, shared.dead = {}, None

    def send(rid, msg):
        inbox = shared.waiting[rid] = _Inbox()

        def reader():  # the event loop's deliveries, spaced in time
            link._deliver(shared, _message("r"))
            for _ in range(3):
                time.sleep(0.02)
                link._deliver(shared, _message("r"))
            time.sleep(0.02)
            link._deliver(shared, _message("r", final=True))

        threading.Thread(target=reader, daemon=True).start()
        return shared, inbox

    link._send = send
    t0 = time.monotonic()
    got = [(len(g), time.monotonic() - t0) for g in link.generate([], ["output_ids"], "r", grouped=True, interval=5.0)]
    assert [n for n, _ in got] == [1, 4]  # the first alone; the other three and the final as one run
    assert got[-1][1] < 2.5  # the final did not wait for the 5 s interval
