"""Runtimes behind one small interface: ``run(pixel_values) -> (class_logits, mask_logits)`` on numpy.

- :class:`TorchRunner`: our PyTorch model (CPU or CUDA), from an HF-format checkpoint folder.
- :class:`service.onnx_runtime.OnnxRunner`: a graph written by ``m2f export onnx``, without torch.

Both carry the model's :class:`~mask2former.config.Mask2FormerConfig` (labels, thing/stuff flags,
preprocessing, thresholds) and an :class:`InputSpec` that says which input axes are fixed, so the
batcher knows whether it may choose batch size and padded shape freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mask2former.config import Mask2FormerConfig


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


class Runner(Protocol):
    name: str  # "torch" | "onnxruntime"
    config: Mask2FormerConfig
    input: InputSpec

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def warmup(self, height: int | None = None, width: int | None = None) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def default_side(config: Mask2FormerConfig) -> int:
    """The checkpoint's shortest edge rounded up to its size divisor: a typical padded side for warm-up."""
    pre = config.preprocess
    div = max(pre.size_divisor, 1)
    return -(-pre.shortest_edge // div) * div


class TorchRunner:
    """Our PyTorch model behind the runner interface; float32 numpy in and out.

    Args:
        path: HF checkpoint folder (default: the bundled demo model).
        device: torch device string.
        threads: intra-op threads for CPU inference (default: torch's choice).
    """

    name = "torch"

    def __init__(self, path: str | Path | None = None, device: str = "cpu", threads: int | None = None):
        # OpenMP threads that wait passively: torch's default, spinning, starves (and is starved by) the
        # service's decode/post-processing threads on the same cores. Demo model, 2 cores, 2 busy numpy
        # threads beside it: 92-174 ms per forward pass passive, 387-614 ms spinning; alone, passive is
        # slower (77-88 vs 36-45 ms): a trade-off for load (bench/spin_wait.py, BENCHMARKS.md). Read when
        # torch first loads OpenMP, so it holds where this runner is the first to import torch.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch  # lazy: the torch runtime is optional (the ONNX Runtime path runs without it)

        from mask2former.weights import DEMO_WEIGHTS, load_model

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.path = Path(path) if path is not None else DEMO_WEIGHTS
        self.device = torch.device(device)
        self.model = load_model(self.path, device=self.device)
        self.config: Mask2FormerConfig = self.model.config
        self.input = InputSpec("pixel_values", ("batch", 3, "height", "width"), np.dtype(np.float32))

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) normalized, padded images -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)."""
        torch = self._torch
        x = np.asarray(pixel_values)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {x.shape}")
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
            return out.class_logits.float().cpu().numpy(), out.mask_logits.float().cpu().numpy()

    def warmup(self, height: int | None = None, width: int | None = None) -> None:
        side = default_side(self.config)
        self.run(np.zeros((1, 3, height or side, width or side), dtype=np.float32))

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "model": self.config.name,
            "device": str(self.device),
            "threads": self._torch.get_num_threads(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def open_runner(
    model: str | Path | None,
    runtime: str,
    device: str = "cpu",
    threads: int | None = None,
    cache_dir: str | Path | None = None,
) -> Runner:
    """The runner for ``runtime`` ("torch" or "onnxruntime"); only that runtime's package is imported."""
    if runtime == "torch":
        return TorchRunner(model, device=device, threads=threads)
    if runtime == "onnxruntime":
        if model is None:
            raise ValueError("the onnxruntime runtime needs an .onnx file")
        from service.onnx_runtime import OnnxRunner

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        return OnnxRunner(model, threads=threads, cache_dir=cache_dir, providers=providers)
    raise ValueError(f"unknown runtime {runtime!r}; choose torch or onnxruntime")
