"""The entry model's pacer: one thread that sends every streamed request's responses after its first.

Why one thread (issue 32). A response sent by a thread that slept until its request's stream interval was due costs
the entry stub 2-5 times the CPU of the same response sent back to back with others: the thread's wake-up, the GIL,
and the Python backend's round trip to tritonserver for each send, paid alone. Measured with a bare decoupled model
on the bundled server (2 vCPU, 16 streams, a response per stream every 4 ms): 94 µs of stub CPU per response with a
sending thread per request, 58 µs with one thread sending everyone's due responses in turn, 35-45 µs back to back
(docs/PERFORMANCE.md). So a request's worker thread prepares it, sends its first response at once (the time to first
token does not wait for a tick), and hands it to the pacer; every `tick` the pacer gives each request in hand a
`pump`, which sends a response when its interval is due, or when its last LLM-step response has arrived.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Protocol

# how often the pacer looks at the requests in hand: a run may leave up to a tick after its interval ended
PACE_TICK_S = 0.005


class Paced(Protocol):
    def pump(self, now: float) -> bool:
        """Send what is due at `now` (monotonic seconds); True once the request has ended (its final response
        sent). Never raises: a failure is the request's own error response."""


class Pacer:
    def __init__(self, tick: float = PACE_TICK_S):
        self.tick = tick
        self.cv = threading.Condition()
        self.new: list[Paced] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="nvlm-pacer", daemon=True)
        self.thread.start()

    def add(self, job: Paced) -> None:
        with self.cv:
            self.new.append(job)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        active: list[Paced] = []
        while True:
            with self.cv:
                while not active and not self.new and not self.closed:
                    self.cv.wait()  # idle: nothing to look at until a request is handed over
                if self.closed:
                    return
                active += self.new
                self.new = []
            start = time.monotonic()
            active = [job for job in active if not self._pump(job, start)]
            # the next round a tick after this one began; at once when this one took longer (a host short of CPU:
            # each send waits for tritonserver), so that runs grow no more than the round's own length
            time.sleep(max(0.0, start + self.tick - time.monotonic()))

    @staticmethod
    def _pump(job: Paced, now: float) -> bool:
        try:
            return job.pump(now)
        except Exception as e:  # noqa: BLE001 — a job's own bug must not stop everyone's responses: drop that one
            print(f"nvlm: a streamed request failed in the pacer and was dropped: {e!r}", file=sys.stderr, flush=True)
            return True
