"""The runner interface: ``run(pixel_values) -> (class_logits, mask_logits)`` on numpy.

- :class:`runtimes.torch_runner.TorchRunner`: our PyTorch model (CPU or CUDA), from an HF-format checkpoint folder.
- :class:`runtimes.onnx_runner.OnnxRunner`: a graph written by ``m2f export onnx``, without torch.

Both carry the model's :class:`~pipeline.config.Mask2FormerConfig` (labels, thing/stuff flags,
preprocessing, thresholds) and an :class:`InputSpec` that says which input axes are fixed, so the
batcher knows whether it may choose batch size and padded shape freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import Mask2FormerConfig


@dataclass(frozen=True)
class InputSpec:
    """The graph's input: name, (B, 3, H, W) with a string where an axis is dynamic, and element type."""

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None when dynamic."""
        return self.shape[0] if isinstance(self.shape[0], int) else None

    @property
    def size(self) -> tuple[int, int] | None:
        """The fixed (height, width), or None when dynamic."""
        h, w = self.shape[2], self.shape[3]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def warmup_batch(self, config: Mask2FormerConfig, height: int | None, width: int | None) -> np.ndarray:
        """Zeros at the graph's fixed shape, or batch 1 at ``height`` x ``width`` (default: the checkpoint's
        shortest edge, square): what a warm-up runs, so that the first request's latency excludes allocation."""
        side = default_side(config)
        size = self.size or (height or side, width or side)
        return np.zeros((self.batch or 1, 3, *size), dtype=self.dtype)

    def check(self, pixel_values: np.ndarray) -> np.ndarray:
        """``pixel_values`` (B, 3, H, W) floating point, checked against this input (a fixed axis must match),
        as a contiguous array of the graph's dtype; ValueError saying what is wrong."""
        x = np.asarray(pixel_values)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {x.shape}")
        for axis, (want, got) in enumerate(zip(self.shape, x.shape)):
            if isinstance(want, int) and want != got:
                raise ValueError(f"pixel_values axis {axis} is {got}; this graph was exported for {want}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"pixel_values must be floating point, got {x.dtype}")
        return np.ascontiguousarray(x, dtype=self.dtype)


class Runner(Protocol):
    name: str  # "torch" | "onnxruntime"
    config: Mask2FormerConfig
    input: InputSpec

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def warmup(self, height: int | None = None, width: int | None = None) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def typical_size(config: Mask2FormerConfig) -> tuple[int, int]:
    """(h, w) of a 4:3 landscape photo (most camera and COCO images) as the checkpoint resizes and pads it:
    the shape batch profiles time. What batching gains depends on the shape, so profiles time the shape real
    photos take rather than a square of the shortest edge (``bench/concurrency.py``, BENCHMARKS.md)."""
    pre = config.preprocess
    div = max(pre.size_divisor, 1)
    scale = pre.shortest_edge / 3
    if pre.longest_edge and 4 * scale > pre.longest_edge:
        scale = pre.longest_edge / 4
    return -(-round(3 * scale) // div) * div, -(-round(4 * scale) // div) * div


def default_side(config: Mask2FormerConfig) -> int:
    """The checkpoint's shortest edge rounded up to its size divisor: a typical padded side for warm-up."""
    pre = config.preprocess
    div = max(pre.size_divisor, 1)
    return -(-pre.shortest_edge // div) * div
