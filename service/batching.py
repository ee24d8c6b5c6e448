"""Dynamic batching: a synchronous policy object (:class:`BatchPolicy`) and the asyncio worker around it.

The policy decides which waiting images form the next batch; it knows nothing of asyncio, HTTP or the
model, and its unit tests drive it with a fake clock. Rules:

- Images are grouped by **bucket**: their padded size rounded up to ``bucket_px`` per side, so a small
  image never waits in (or pads to) a batch of large ones. A batch pads to its largest member (rounded
  to the model's size divisor), not to the bucket's bound. A fixed-shape graph has one bucket, its shape.
- A bucket is **ready** when it holds ``max_batch_size`` images, or when its oldest image has waited
  ``max_delay_s``. Of the ready buckets, the one whose oldest image is oldest goes first (FIFO across
  buckets, so no bucket starves); a batch takes that bucket's images in arrival order.

:class:`Batcher` runs one batch at a time in a single-thread executor (the runtime's intra-op threads use
the cores) while the event loop keeps admitting requests; each request awaits its own future, which gets
its image's slice of the outputs or the batch's exception (a failing batch fails only its own requests).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.gate import TurnGate

log = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(eq=False)
class Item:
    """One image waiting for a batch."""

    pixels: np.ndarray  # (3, h, w) float32, normalized; h, w multiples of the size divisor
    resized_size: Size  # (h, w) of the image inside ``pixels`` (the rest is padding)
    enqueued: float = 0.0  # clock time of ``BatchPolicy.add``
    future: Any = None  # set by the Batcher: the asyncio future the request awaits
    seq: int = 0  # arrival order, set by ``BatchPolicy.add``
    # Set by the Batcher after its pass: the gate's place in line for its post-processing, which the submitter
    # owns: pass it to ``ServiceState.before`` or give it back (``TurnGate.forget``), else later passes wait.
    ticket: int | None = None


@dataclass(frozen=True)
class BatchResult:
    """An image's share of a batch's outputs."""

    class_logits: np.ndarray  # (Q, K+1)
    mask_logits: np.ndarray  # (Q, Hp/4, Wp/4), Hp x Wp the batch's padded size
    batch_size: int  # images in the batch (without filler images of a fixed-batch graph)
    queue_s: float  # enqueued -> the batch started
    inference_s: float  # the batch's forward pass


class BatchPolicy:
    """Which waiting images go into the next forward pass.

    Args:
        max_batch_size: images per batch at most (a fixed-batch graph: its batch size).
        max_delay_s: how long the oldest image of a bucket may wait for the bucket to fill.
        bucket_px: bucket granularity in pixels per side.
        size_divisor: the model's padding multiple.
        fixed_size: the graph's fixed (H, W), if any: every image pads to it.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_delay_s: float,
        bucket_px: int = 128,
        size_divisor: int = 32,
        fixed_size: Size | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.bucket_px = max(bucket_px, 1)
        self.size_divisor = max(size_divisor, 1)
        self.fixed_size = fixed_size
        self._buckets: dict[Size, list[Item]] = {}
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return sum(len(items) for items in self._buckets.values())

    def bucket(self, height: int, width: int) -> Size:
        """The bucket of an image whose padded size is ``height`` x ``width``."""
        if self.fixed_size is not None:
            return self.fixed_size
        step = self.bucket_px
        return -(-height // step) * step, -(-width // step) * step

    def add(self, item: Item, now: float) -> None:
        h, w = item.pixels.shape[1:]
        if self.fixed_size is not None and (h > self.fixed_size[0] or w > self.fixed_size[1]):
            raise ValueError(f"image of {h}x{w} does not fit the graph's fixed {self.fixed_size}")
        item.enqueued = now
        item.seq = next(self._arrivals)
        self._buckets.setdefault(self.bucket(h, w), []).append(item)

    def remove(self, item: Item) -> bool:
        """Take a waiting image out (its client left or its deadline passed); False if not waiting."""
        key = self.bucket(*item.pixels.shape[1:])
        items = self._buckets.get(key, [])
        if item not in items:
            return False
        items.remove(item)
        if not items:
            del self._buckets[key]
        return True

    def next_batch(self, now: float, limit: int | None = None) -> list[Item] | None:
        """The images of the next batch (removed from the policy), or None when no bucket is ready; ``limit``
        (at most ``max_batch_size``) stands for ``max_batch_size`` in this one decision (:class:`BatchCheck`)."""
        n = self.max_batch_size if limit is None else max(1, min(limit, self.max_batch_size))
        ready = [
            (items[0].seq, key)
            for key, items in self._buckets.items()
            if len(items) >= n or now >= items[0].enqueued + self.max_delay_s
        ]
        if not ready:
            return None
        _, key = min(ready)
        items = self._buckets[key]
        batch, rest = items[:n], items[n:]
        if rest:
            self._buckets[key] = rest
        else:
            del self._buckets[key]
        return batch

    def fullest(self) -> int:
        """Images waiting in the fullest bucket."""
        return max((len(items) for items in self._buckets.values()), default=0)

    def next_deadline(self) -> float | None:
        """Clock time at which a bucket becomes ready by waiting, or None when nothing waits."""
        if not self._buckets:
            return None
        return min(items[0].enqueued for items in self._buckets.values()) + self.max_delay_s

    def padded_size(self, batch: list[Item]) -> Size:
        """(H, W) the batch pads to: the fixed size, or its largest image rounded to the size divisor."""
        if self.fixed_size is not None:
            return self.fixed_size
        d = self.size_divisor
        h = max(it.pixels.shape[1] for it in batch)
        w = max(it.pixels.shape[2] for it in batch)
        return -(-h // d) * d, -(-w // d) * d


def assemble(batch: list[Item], size: Size, batch_size: int | None = None) -> np.ndarray:
    """Stack images into one zero-padded (B, 3, H, W) array; ``batch_size`` pads with zero images too."""
    n = max(len(batch), batch_size or 0)
    out = np.zeros((n, 3, *size), dtype=np.float32)
    for i, it in enumerate(batch):
        _, h, w = it.pixels.shape
        out[i, :, :h, :w] = it.pixels
    return out


class Batcher:
    """Feeds batches from a :class:`BatchPolicy` to ``run`` (the runtime) on ``executor``, one at a time.

    Args:
        policy: the batching policy.
        run: (B, 3, H, W) -> (class_logits (B, Q, K+1), mask_logits (B, Q, H/4, W/4)).
        executor: where ``run`` executes (a single worker thread: batches do not overlap).
        fixed_batch: the graph's fixed batch size, if any (batches are padded with zero images).
        on_batch: called with (batch size, inference seconds) after each batch (metrics).
        on_depth: called with the number of waiting images whenever it changes (metrics).
        clock: the time source (``time.monotonic``).
        gate: whose turn it is on the cores (:class:`~service.gate.TurnGate`): each pass, padding included,
            runs in its ``forward()``; inference seconds are counted from when the pass got its turn.
        check: checks the batch size against the served passes (:class:`BatchCheck`), if any: it sets the
            batch size limit of each batch and sees every pass.
    """

    def __init__(
        self,
        policy: BatchPolicy,
        run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
        executor: Executor,
        fixed_batch: int | None = None,
        on_batch: Callable[[int, float], None] = lambda n, s: None,
        on_depth: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.monotonic,
        gate: TurnGate | None = None,
        check: BatchCheck | None = None,
    ):
        self.policy = policy
        self.check = check
        self.gate = gate or TurnGate(enabled=False)
        self.run = run
        self.executor = executor
        self.fixed_batch = fixed_batch
        self.on_batch = on_batch
        self.on_depth = on_depth
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        """Stop the worker; images still waiting fail with ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while (batch := self.policy.next_batch(float("inf"))) is not None:
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(RuntimeError("the server is shutting down"))
        self.on_depth(0)

    def submit(self, item: Item) -> asyncio.Future:
        """Queue one image; the returned future resolves to its :class:`BatchResult`."""
        item.future = asyncio.get_running_loop().create_future()
        self.policy.add(item, self.clock())
        self.on_depth(len(self.policy))
        self._wake.set()
        return item.future

    def cancel(self, item: Item) -> bool:
        """Drop a waiting image (True), or report that its batch has already started (False)."""
        removed = self.policy.remove(item)
        if removed:
            self.on_depth(len(self.policy))
        return removed

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            limit = None if self.check is None else self.check.limit(self.policy.fullest())
            batch = self.policy.next_batch(self.clock(), limit)
            if batch is None:
                deadline = self.policy.next_deadline()
                timeout = None if deadline is None else max(deadline - self.clock(), 0.0)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            self.on_depth(len(self.policy))
            batch = [it for it in batch if not it.future.done()]
            if not batch:
                continue
            size = self.policy.padded_size(batch)
            started = self.clock()
            try:  # padding the batch is a large copy: it runs in the executor too, off the event loop
                (class_logits, mask_logits), inference_s = await loop.run_in_executor(
                    self.executor, self._forward, batch, size
                )
            except Exception as e:  # the batch's requests fail; the worker goes on
                log.exception("batch of %d failed", len(batch))
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            self.on_batch(len(batch), inference_s)
            if self.check is not None:
                self.check.observe(len(batch), inference_s / (size[0] * size[1]))
            for i, it in enumerate(batch):
                if not it.future.done():
                    # Its post-processing goes before the next pass: the ticket is taken here, before that pass
                    # is submitted (the request would take one only once the event loop resumes it, and the
                    # next pass, started from the inference thread, usually got in line first). Given back by
                    # the request whatever happens to it (service.segment.answer).
                    it.ticket = self.gate.ticket()
                    it.future.set_result(
                        BatchResult(class_logits[i], mask_logits[i], len(batch), started - it.enqueued, inference_s)
                    )

    def _forward(self, batch: list[Item], size: Size) -> tuple[tuple[np.ndarray, np.ndarray], float]:
        """In the executor: the padded batch through the model in its turn -> (outputs, seconds it took)."""
        with self.gate.forward():
            t0 = self.clock()
            out = self.run(assemble(batch, size, self.fixed_batch))
            return out, self.clock() - t0


# ---------------------------------------------------------------------------------------------- batch size
BATCH_GAIN = 1.10  # a larger batch is used only if it raises throughput (images/s) by at least this factor


def profile_batches(
    run: Callable[[np.ndarray], Any],
    size: Size,
    max_batch_size: int,
    repeats: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, list[float]]:
    """Seconds of each measured forward pass by batch size, at 1, 2, 4, ... <= ``max_batch_size`` (and
    ``max_batch_size`` itself), for (B, 3, *size) zero images: ``repeats`` rounds, after one unmeasured pass
    of each size; ``[r]`` of every size is round r.

    The sizes take turns (1 2 4, then 4 2 1, ...) rather than being timed one after the other: a shared
    or throttled CPU changes speed from one second to the next (a 2-core VM moved one model's pass from 0.83
    to 1.25 s within a minute), and a slow moment that fell on batch 1 alone would make batching look like a
    gain it is not. :func:`choose_batch_size` compares sizes within each round."""
    sizes = sorted(
        {b for b in (1 << k for k in range(max_batch_size.bit_length())) if b <= max_batch_size} | {max_batch_size}
    )
    inputs = {b: np.zeros((b, 3, *size), dtype=np.float32) for b in sizes}
    for b in sizes:
        run(inputs[b])  # allocations and kernel choices for this shape
    seconds: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(repeats):
        for b in sizes if r % 2 == 0 else sizes[::-1]:
            t0 = clock()
            run(inputs[b])
            seconds[b].append(clock() - t0)
    return seconds


def describe_profile(seconds: dict[int, Sequence[float]]) -> str:
    """The profile for a log line: seconds per image of each round by batch size, '1: 1.313/1.402s, 2: ...'."""
    return ", ".join(f"{b}: {'/'.join(f'{t / b:.3f}' for t in ts)}s" for b, ts in seconds.items())


def choose_batch_size(seconds: dict[int, Sequence[float]], max_batch_s: float | None = None) -> int:
    """The batch size to use from the profile: seconds of each measured pass by batch size, one per round
    (:func:`profile_batches`).

    Starting at 1, a larger batch replaces the current choice only if its throughput (images per second)
    is at least ``BATCH_GAIN`` times the current one's in every round, and, when ``max_batch_s`` is given,
    its fastest pass takes no longer than that (a latency limit). Batching never lowers throughput: on a
    CPU whose cores one image already fills, the answer is 1. Comparing within rounds, not the fastest pass
    of each size: a fast moment of the machine on one batch-2 pass made batch 2 look 17 % faster per image
    than batch 1 (1.21 vs 1.42 s, swin-tiny on 2 cores) where another start measured it 6 % slower, and
    serving at 8 clients lost throughput against 1.
    """
    if not seconds:
        return 1
    choice = min(seconds)
    for b in sorted(seconds):
        if max_batch_s is not None and min(seconds[b]) > max_batch_s and b > min(seconds):
            break
        if b != choice and all(
            b / t >= BATCH_GAIN * (choice / t_choice) for t, t_choice in zip(seconds[b], seconds[choice], strict=True)
        ):
            choice = b
    return choice


CHECK_EVERY = 6  # passes between two checks of the batch size the profile chose against batch 1 (BatchCheck)
CHECK_PAIRS = 5  # a decision takes the median of the last this many pairs of passes (and at least 3)


class BatchCheck:
    """Checks the profile's batch size against the passes the server runs, and turns batching off (and back on)
    by what they show.

    The profile (:func:`profile_batches`) is a few seconds at start-up: a slow moment of a shared CPU on its
    batch-1 passes (swin-tiny on 2 cores: 1.64 and 1.90 s per image, where other starts measured 1.04-1.35)
    chose batch 2, and that server answered 8 clients at 0.42 images/s against 0.53 for one. So while serving,
    passes of the two sizes -- 1 and the profile's ``size`` -- are compared in **pairs**: a pass of one size
    next to a pass of the other, which the machine ran at about the same speed. After ``every`` passes of the
    size in use without a pair, the next batch has the other size (batch 1; or ``size`` when batching is off
    and that many images wait in one bucket); load alone makes pairs too. Time per image is divided by the
    batch's padded pixels, so that images of other sizes compare. Batches of ``size`` stay in use while the
    median of the last ``pairs`` pairs (of at least 3) has them ``BATCH_GAIN`` times faster per image, the
    profile's own rule; until 3 pairs are in, the profile's choice stands.

    Synchronous, no clock: the :class:`Batcher` asks :meth:`limit` before each batch and reports each pass to
    :meth:`observe`.
    """

    def __init__(self, size: int, every: int = CHECK_EVERY, pairs: int = CHECK_PAIRS):
        if size < 2:
            raise ValueError(f"the batch size to check must be >= 2, got {size}")
        self.size = size
        self.every = every
        self.in_use = size  # the batch size now: ``size`` or 1
        self.ratios: collections.deque[float] = collections.deque(maxlen=max(pairs, 3))  # size's / 1's, per pixel
        self._last: tuple[int, float] | None = None  # the last pass: (batch size, seconds per image and pixel)
        self._since = 0  # passes of the size in use since the last pair

    def limit(self, waiting: int) -> int:
        """The batch size limit of the next batch, with ``waiting`` images in the fullest bucket."""
        other = 1 if self.in_use == self.size else self.size
        # Right after a pass of the size in use, so that the two make a pair. Passes of the other size that load
        # made do not count towards ``every``: a server whose batches of 2 did not form (requests spaced out)
        # would otherwise force batch 1 on every later pass, batching off for good whatever the pairs said.
        if self._since >= self.every and self._last is not None and self._last[0] == self.in_use and waiting >= other:
            return other
        return self.in_use

    def observe(self, images: int, seconds_per_pixel: float) -> None:
        """A pass of ``images`` images took ``seconds_per_pixel`` seconds per pixel of its padded size."""
        if images not in (1, self.size):  # a part batch: compares with neither
            self._last = None
            return
        this, last = (images, seconds_per_pixel / images), self._last
        self._last = this
        if last is None or last[0] == images:
            self._since += images == self.in_use
            return
        one, big = (this, last) if images == 1 else (last, this)
        self.ratios.append(big[1] / one[1])
        self._since = 0
        self._last = None  # a pass counts in one pair only
        if len(self.ratios) >= 3:
            ratio = statistics.median(self.ratios)
            in_use = self.size if ratio * BATCH_GAIN <= 1.0 else 1
            if in_use != self.in_use:
                log.info(
                    "batches of %d took %.2f times the time per image of batch 1 (median of %d pairs of passes): "
                    "batch size %d",
                    self.size,
                    ratio,
                    len(self.ratios),
                    in_use,
                )
            self.in_use = in_use

    def describe(self) -> dict[str, Any]:
        """For /v1/model: the size checked, the size in use, and the pairs' time-per-image ratios."""
        return {"checked": self.size, "in_use": self.in_use, "ratios": [round(r, 3) for r in self.ratios]}
