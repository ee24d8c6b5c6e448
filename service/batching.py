"""The start-up batch profile: how large a batch pays on this machine (:func:`profile_batches`,
:func:`choose_batch_size`). The service runs it once, when ``max_batch_size`` is not given; what is batched
with what, and when, is the scheduler's (:mod:`service.scheduler`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Size = tuple[int, int]

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
