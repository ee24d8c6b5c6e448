"""Runtimes behind one small interface: ``run(pixel_values) -> (class_logits, mask_logits)`` on numpy.

- :mod:`runtimes.runner`: the interface (:class:`Runner`, :class:`InputSpec`, :func:`default_side`, :func:`typical_size`).
- :mod:`runtimes.torch_runner`: :class:`TorchRunner`, our PyTorch model (torch is imported when one opens).
- :mod:`runtimes.onnx_runner`: ``OnnxRunner``, a graph written by ``m2f export onnx``, without torch.
- :mod:`runtimes.ort_session`: how ONNX Runtime sessions are opened (threads, graph optimizations), for the
  runner and for the exporter's check alike.

:func:`open_runner` opens the runner for a runtime name, importing only that runtime's package. Importing
this package imports neither torch nor onnxruntime; ``runtimes.OnnxRunner`` loads on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtimes.runner import InputSpec, Runner, default_side, typical_size
from runtimes.torch_runner import TorchRunner

__all__ = ["InputSpec", "OnnxRunner", "Runner", "TorchRunner", "default_side", "open_runner", "typical_size"]


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
        from runtimes.onnx_runner import OnnxRunner  # lazy: onnxruntime (the torch runtime runs without it)

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        return OnnxRunner(model, threads=threads, cache_dir=cache_dir, providers=providers)
    raise ValueError(f"unknown runtime {runtime!r}; choose torch or onnxruntime")


def __getattr__(name: str) -> Any:
    if name == "OnnxRunner":
        from runtimes.onnx_runner import OnnxRunner  # lazy: onnxruntime (the torch runtime runs without it)

        return OnnxRunner
    raise AttributeError(f"module 'runtimes' has no attribute {name!r}")
