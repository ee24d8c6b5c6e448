"""Admission by measured capacity: would a request let in now be answered before its deadline?

The service admits a request only while ``predicted_s(admitted)`` -- the time until the requests already
admitted, and then this one, are answered -- fits in a share of the time the request has left. The
prediction is the measured cost of one request alone (``latency_s``: its forward pass per image plus its
decoding, post-processing and encoding) plus the measured time between answers while the server is busy
(``interval_s``, the inverse of its throughput, contention included) for each request ahead of it. Both
are moving averages; the warm-up seeds them. What this model leaves out (the event loop reading many
uploads, other processes on the cores) is learnt from the answers: each admitted request's real time from
admission to answer is compared with what was predicted for it, and the predictions are scaled by the
moving average of that ratio (``calibration``; used at least 1: a server is not trusted to be faster than it
measured). The average itself is not floored, so that noise around 1 cannot ratchet it up. A wrong guess
costs a 503, not a 504; how far the real times stray from the predictions (``m2f_admission_error``) is the
margin ``Settings.admit_share`` must leave.

No asyncio, HTTP or model here: the unit tests drive it with a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

ALPHA = 0.2  # weight of the newest sample in the moving averages


class Admission(NamedTuple):
    """When a request was admitted (clock time) and the time to its answer predicted then (None before the
    server's first answer: :meth:`service.state.ServiceState.admit`)."""

    at: float
    predicted_s: float | None


def _average(old: float, new: float) -> float:
    return (1 - ALPHA) * old + ALPHA * new


class Capacity:
    """Moving averages of what a request costs, and the wait they predict."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.forward_s = 0.0  # forward pass per image
        self.cpu_s = 0.0  # decoding + post-processing + encoding per request (their running time)
        self.cpu_time_s: float | None = None  # the same work's CPU time (thread time), None before an answer
        self.interval_s = 0.0  # between two answers while busy
        self._ratio = 1.0  # real / predicted time of admitted requests (moving average)
        self._last_answer: float | None = None
        self._busy_since: float | None = None

    @property
    def calibration(self) -> float:
        """What predictions are scaled by: the measured real / predicted ratio, at least 1."""
        return max(1.0, self._ratio)

    @property
    def answered(self) -> bool:
        """Whether any request has been answered yet."""
        return self._last_answer is not None

    @property
    def latency_s(self) -> float:
        """One request on an idle server."""
        return self.forward_s + self.cpu_s

    def seed(self, forward_s: float) -> None:
        """Start from one measured forward pass (the warm-up: slower than later ones, so cautious)."""
        self.forward_s = self.interval_s = forward_s

    def on_batch(self, images: int, seconds: float) -> None:
        self.forward_s = _average(self.forward_s, seconds / max(images, 1))

    def on_admitted(self, admitted_before: int) -> None:
        """A request was let in when ``admitted_before`` were already in."""
        if admitted_before == 0:
            self._busy_since = self.clock()

    def on_answered(self, cpu_s: float, cpu_time_s: float = 0.0, admission: Admission | None = None) -> float | None:
        """A request was answered 200 after ``cpu_s`` seconds of work in the CPU pool (``cpu_time_s`` of CPU
        time); its ``admission`` (when, and what :meth:`predicted_s` said then) calibrates later predictions.
        Returns its real / predicted time (None without a prediction)."""
        now = self.clock()
        self.cpu_s = _average(self.cpu_s, cpu_s)
        self.cpu_time_s = cpu_time_s if self.cpu_time_s is None else _average(self.cpu_time_s, cpu_time_s)
        ratio = None
        if admission is not None and admission.predicted_s:
            ratio = (now - admission.at) / admission.predicted_s
            self._ratio = _average(self._ratio, ratio)
        if self._busy_since is not None:
            if self._last_answer is not None and self._last_answer >= self._busy_since:
                gap = now - self._last_answer  # between two answers of one busy period
            else:
                # The first answer after becoming busy comes one whole latency after it, one-off costs included
                # (at start-up, 8.6 s for 1.2 s passes after a burst of 8): counted as at most one latency, the
                # cautious guess where requests come one at a time.
                gap = min(now - self._busy_since, self.latency_s)
            self.interval_s = _average(self.interval_s, gap)
        self._last_answer = now
        return ratio

    def predicted_s(self, ahead: int) -> float:
        """Seconds until a request let in now is answered, with ``ahead`` requests admitted before it."""
        return self.calibration * (self.latency_s + ahead * max(self.interval_s, 0.0))
