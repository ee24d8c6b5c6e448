"""Batches: which waiting images go into one forward pass (:class:`BatchPolicy`), how they are padded into
one array (:func:`assemble`), and the start-up profile that says how large a batch pays on this machine
(:func:`profile_batches`, :func:`choose_batch_size`).

Synchronous and clock-free (the caller passes the time): the service's scheduler and ``m2f batch`` both use it.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Size = tuple[int, int]


# ---------------------------------------------------------------------------------------------- batches
@dataclass(eq=False)
class Item:
    """One image waiting for a pass."""

    pixels: np.ndarray  # (3, h, w) float32, normalized; h, w multiples of the size divisor
    resized_size: Size  # (h, w) of the image inside ``pixels`` (the rest is padding)
    enqueued: float = 0.0  # clock time of ``BatchPolicy.add``
    seq: int = 0  # its job's admission order (older goes first)
    job: Any = None


class BatchPolicy:
    """Which waiting images go into the next pass; synchronous, no clock of its own.

    Images are grouped by bucket: their padded size rounded up to ``bucket_px`` per side, so a small image
    never waits in (or pads to) a batch of large ones; a batch pads to its largest member. A fixed-shape
    graph has one bucket, its shape. A bucket keeps its images in admission order (``seq``) and is ready when it
    holds ``max_batch_size`` images or one has waited ``max_delay_s``; of the ready buckets the one holding the
    oldest image goes first, and a batch takes a bucket's oldest images.
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
        bisect.insort(self._buckets.setdefault(self.bucket(h, w), []), item, key=lambda it: it.seq)  # oldest first

    def remove(self, item: Item) -> bool:
        """Take a waiting image out; False if it is not waiting."""
        key = self.bucket(*item.pixels.shape[1:])
        items = self._buckets.get(key, [])
        if item not in items:
            return False
        items.remove(item)
        if not items:
            del self._buckets[key]
        return True

    def _ready_key(self, now: float) -> Size | None:
        n = self.max_batch_size
        ready = [
            (items[0].seq, key)
            for key, items in self._buckets.items()
            if len(items) >= n or now >= min(it.enqueued for it in items) + self.max_delay_s
        ]
        return min(ready)[1] if ready else None

    def peek(self, now: float) -> list[Item] | None:
        """The images of the next batch (left in place), or None when no bucket is ready."""
        key = self._ready_key(now)
        return None if key is None else self._buckets[key][: self.max_batch_size]

    def next_batch(self, now: float) -> list[Item] | None:
        """The images of the next batch, removed from the policy, or None when no bucket is ready."""
        key = self._ready_key(now)
        if key is None:
            return None
        items = self._buckets[key]
        batch, rest = items[: self.max_batch_size], items[self.max_batch_size :]
        if rest:
            self._buckets[key] = rest
        else:
            del self._buckets[key]
        return batch

    def next_deadline(self) -> float | None:
        """Clock time at which a bucket becomes ready by waiting, or None when nothing waits."""
        if not self._buckets:
            return None
        return min(it.enqueued for items in self._buckets.values() for it in items) + self.max_delay_s

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

    The sizes take turns (1 2 4, then 4 2 1, ...) rather than being timed one after the other: a shared or
    throttled CPU changes speed from one second to the next, and a slow moment that fell on batch 1 alone would
    make batching look like a gain it is not. :func:`choose_batch_size` compares sizes within each round."""
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
    CPU whose cores one image already fills, the answer is 1. Sizes are compared within rounds, not by the
    fastest pass of each: one lucky pass must not make a batch size look faster than it is (BENCHMARKS.md).
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
