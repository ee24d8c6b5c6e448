"""Runtimes behind one small interface: ``run(pixel_values) -> (class_logits, mask_logits)`` on numpy.

- :mod:`runtimes.runner`: the interface (:class:`Runner`, :class:`InputSpec`, :func:`default_side`, :func:`typical_size`).
- :mod:`runtimes.torch_runner`: :class:`TorchRunner`, our PyTorch model (torch is imported when one opens).
- :mod:`runtimes.onnx_runner`: ``OnnxRunner``, a graph written by ``m2f export onnx``, without torch.
- :mod:`runtimes.ort_session`: how ONNX Runtime sessions are opened (threads, graph optimizations), for the
  runner and for the exporter's check alike.
- :mod:`runtimes.openvino_runner`: ``OpenVinoRunner``, the same ``.onnx`` file in OpenVINO (an optional extra).
- :mod:`runtimes.cpu_class`: which of them serves on which CPU class (a table, measured in ``bench/``).

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
    """The runner for ``runtime``; only that runtime's package is imported. "torch"; "onnxruntime";
    "openvino" / "openvino-bf16" (an .onnx file in OpenVINO, f32 or bf16 inference precision); "auto" (an .onnx
    file on the CPU): the runtime :data:`runtimes.cpu_class.DEFAULT_RUNNER` picks for this CPU's class."""
    if runtime == "auto":
        if device != "cpu":
            runtime = "onnxruntime"
        else:
            from runtimes.cpu_class import default_runtime  # lazy: onnxruntime (its int8 kernel probe)

            runtime = default_runtime()[1]
    if runtime == "torch":
        return TorchRunner(model, device=device, threads=threads)
    if runtime == "onnxruntime":
        if model is None:
            raise ValueError("the onnxruntime runtime needs an .onnx file")
        from runtimes.onnx_runner import OnnxRunner  # lazy: onnxruntime (the torch runtime runs without it)

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        return OnnxRunner(model, threads=threads, cache_dir=cache_dir, providers=providers)
    if runtime in ("openvino", "openvino-bf16"):
        if model is None or device != "cpu":
            raise ValueError("the openvino runtime runs an .onnx file on the CPU")
        try:
            from runtimes.openvino_runner import OpenVinoRunner  # lazy: openvino (an optional extra)
        except ModuleNotFoundError as e:
            if e.name != "openvino":
                raise
            raise RuntimeError(f"runtime {runtime!r} needs OpenVINO: pip install 'mask2former-serve[openvino]'") from e

        precision = "bf16" if runtime == "openvino-bf16" else "f32"
        return OpenVinoRunner(model, threads=threads, precision=precision, cache_dir=cache_dir)
    raise ValueError(f"unknown runtime {runtime!r}; choose torch, onnxruntime, openvino, openvino-bf16 or auto")


def __getattr__(name: str) -> Any:
    if name == "OnnxRunner":
        from runtimes.onnx_runner import OnnxRunner  # lazy: onnxruntime (the torch runtime runs without it)

        return OnnxRunner
    raise AttributeError(f"module 'runtimes' has no attribute {name!r}")
