"""Forward passes and the requests' CPU work taking turns on the cores (:class:`TurnGate`).

Where the forward pass runs on the CPU with every core (its intra-op threads), decoding and post-processing
run beside it only by taking cores from it, and a parallel region waits for its slowest thread: the pass
slows by more than the work that interrupts it. Measured (swin-tiny, ONNX Runtime fp32, 640x480 photos, AMD
EPYC 2 cores, 8 clients against 1, ``bench/concurrency.py``): the forward pass took 1.08 s per image alone and
1.19-1.35 s with post-processing beside it, post-processing 0.04 s alone and 0.09-0.23 s beside the pass,
and 8 clients got 8 % less throughput than 1 (pooled over 4 rounds).

So they take turns, in the order they became ready: CPU tasks together (as many as the CPU pool has threads),
a forward pass alone. A pass that becomes ready while CPU tasks are queued or running waits for them (they
are short, and they answer or admit requests sooner); CPU tasks queued during a pass wait for it. On a GPU,
or with fewer intra-op threads than cores, overlapping is what pays: the gate is then open
(``enabled=False``) and costs nothing. It also pays where the pass is short against the CPU work: the bundled
demo model (a 70 ms pass, 25 ms of CPU work per 640x480 photo, batch 2) got 1.39x from 8 clients against 1
overlapping and 1.14-1.21x taking turns. ``enabled`` may change while serving (the service sets it from the
measured ratio, :meth:`service.state.ServiceState.on_answered`); tasks already waiting then go on.

Threads only (no asyncio): a CPU task takes its :meth:`ticket` when it is queued, on the event loop, and waits
in :meth:`cpu` in its worker; a pass waits in :meth:`forward` in the inference thread.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TurnGate:
    """CPU tasks run together, a forward pass alone, in the order they became ready (``enabled``), or all at
    once (not ``enabled``)."""

    def __init__(self, enabled: bool = True):
        self._enabled = enabled
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._cpu: set[int] = set()  # tickets of CPU tasks queued or running
        self._passes: set[int] = set()  # tickets of forward passes waiting or running

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        with self._cond:
            self._enabled = value
            self._cond.notify_all()  # whoever waits for a turn goes on once the gate opens

    def ticket(self) -> int:
        """A CPU task's place in line, taken when it is queued. Give it back with :meth:`forget` if the task
        never runs (cancelled while queued); :meth:`cpu` gives it back when the task ends."""
        with self._cond:
            if not self._enabled:
                return -1  # runs at once whatever happens later
            t = next(self._order)
            self._cpu.add(t)
            return t

    def forget(self, ticket: int) -> None:
        """The task of ``ticket`` is done or will never run (idempotent)."""
        with self._cond:
            self._cpu.discard(ticket)
            self._cond.notify_all()

    @contextmanager
    def cpu(self, ticket: int) -> Iterator[None]:
        """Run a CPU task once no forward pass that became ready before it is waiting or running."""
        with self._cond:
            self._cond.wait_for(lambda: not self._enabled or not self._passes or min(self._passes) > ticket)
        try:
            yield
        finally:
            self.forget(ticket)

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Run a forward pass alone, after the CPU tasks queued before it."""
        with self._cond:
            t = next(self._order)
            self._passes.add(t)  # also when open: CPU tasks must see a running pass if the gate closes
            self._cond.wait_for(lambda: not self._enabled or (min(self._passes) == t and all(c > t for c in self._cpu)))
        try:
            yield
        finally:
            with self._cond:
                self._passes.discard(t)
                self._cond.notify_all()

    def busy(self) -> tuple[int, int]:
        """(CPU tasks queued or running, forward passes waiting or running): for tests and debugging."""
        with self._cond:
            return len(self._cpu), len(self._passes)
