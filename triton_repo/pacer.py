"""The entry model's pacer: one thread that sends every streamed request's responses after its first.

Why one thread (issue 32). A response sent by a thread that slept until its request's stream interval was due costs
the entry stub 2-5 times the CPU of the same response sent back to back with others: the thread's wake-up, the GIL,
and the Python backend's round trip to tritonserver for each send, paid alone. Measured with a bare decoupled model
on the bundled server (2 vCPU, 16 streams, a response per stream every 4 ms): 94 µs of stub CPU per response with a
sending thread per request, 58 µs with one thread sending everyone's due responses in turn, 35-45 µs back to back
(docs/PERFORMANCE.md). So a request's worker thread prepares it, sends its first response at once (the time to first
token does not wait for a round), and hands it to the pacer with the time its next run is due.

Rounds. The pacer sleeps until the earliest due time, but never less than `tick` after its last round began, and
then gives a turn (`pump`) to every request that is due: their sends go back to back. A request whose LLM-step
request has ended is woken at once (`wake`, from the thread that read the last response): its final response does
not wait for its interval. The others are not looked at between their turns: a turn for every request at every tick
found nothing due in seven turns out of eight (a lone request paid for all of them: with this session's other cuts,
the entry's CPU per token at concurrency 1 halved; at 32 requests the turns were a few percent, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import heapq
import itertools
import sys
import threading
import time
from typing import Protocol

# the least time between two rounds: a run may leave up to a tick after its interval ended
PACE_TICK_S = 0.005


class Paced(Protocol):
    def pump(self, now: float) -> float | None:
        """Send what is due at `now` (monotonic seconds); the time of the next turn, or None once the request has
        ended (its final response sent). Never raises: a failure is the request's own error response."""


class Pacer:
    def __init__(self, tick: float = PACE_TICK_S):
        self.tick = tick
        self.cv = threading.Condition()
        self.new: list[tuple[Paced, float]] = []  # handed over, not yet scheduled (any thread)
        self.woken: list[Paced] = []  # to be given a turn at the next round whatever their due time (any thread)
        self.closed = False
        # the pacer thread's own: (due, seq, job) in time order, and each live job's current seq (an entry whose seq
        # is not current was superseded by a turn given earlier, on a wake)
        self.heap: list[tuple[float, int, Paced]] = []
        self.live: dict[Paced, int] = {}
        self.seq = itertools.count()
        self.thread = threading.Thread(target=self._loop, name="nvlm-pacer", daemon=True)
        self.thread.start()

    def add(self, job: Paced, due: float) -> None:
        """Hand `job` over; its first turn at `due` (monotonic seconds) or when woken."""
        with self.cv:
            self.new.append((job, due))
            self.cv.notify()

    def wake(self, job: Paced) -> None:
        """Give `job` a turn at the next round (its request has ended). A job no longer in hand is ignored."""
        with self.cv:
            self.woken.append(job)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.closed and not self.new and not self.woken:
                    if not self.heap:
                        self.cv.wait()  # idle: nothing in hand until a request is handed over
                        continue
                    left = self.heap[0][0] - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
                if self.closed:
                    return
                new, woken, self.new, self.woken = self.new, self.woken, [], []
            for job, due in new:
                self._schedule(job, due)
            start = time.monotonic()
            for job in woken:
                if job in self.live:
                    self._turn(job, start)
            while self.heap and self.heap[0][0] <= start:
                _, seq, job = heapq.heappop(self.heap)
                if self.live.get(job) == seq:
                    self._turn(job, start)
            # the next round a tick after this one began at the earliest (at once when it took longer: a host short of
            # CPU, where each send waits for tritonserver), so that the sends of the requests due meanwhile go together
            time.sleep(max(0.0, start + self.tick - time.monotonic()))

    def _schedule(self, job: Paced, due: float) -> None:
        seq = next(self.seq)
        self.live[job] = seq
        heapq.heappush(self.heap, (due, seq, job))

    def _turn(self, job: Paced, now: float) -> None:
        try:
            due = job.pump(now)
        except Exception as e:  # noqa: BLE001 — a job's own bug must not stop everyone's responses: drop that one
            print(f"nvlm: a streamed request failed in the pacer and was dropped: {e!r}", file=sys.stderr, flush=True)
            due = None
        if due is None:
            del self.live[job]
        else:
            self._schedule(job, due)
