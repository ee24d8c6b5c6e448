"""OpenVINO runner for a graph written by ``m2f export onnx``: the same ``.onnx`` file, the same interface as
:class:`runtimes.onnx_runner.OnnxRunner`, no torch.

OpenVINO reads the ONNX file itself (labels, thresholds and preprocessing come from the file's metadata,
:mod:`model_format.metadata`) and compiles it for this CPU. ``precision`` is OpenVINO's inference precision
hint: "f32" (the default here; exact to the exporter's float32 tolerance) or "bf16" (bfloat16 matmuls and
convolutions, fast where the CPU has AMX). OpenVINO itself defaults to bf16 on CPUs that have bf16
instructions (AVX512_BF16, AMX), which would silently change the numbers: the runner always says which.
int8 exports run too (OpenVINO executes ``DynamicQuantizeLinear`` / ``MatMulInteger`` as they are).

Which runner ``m2f serve`` uses on which CPU: :mod:`runtimes.cpu_class`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from model_format.metadata import file_sha256, read_metadata
from pipeline.config import Mask2FormerConfig
from runtimes.runner import InputSpec, available_cpus

PRECISIONS = ("f32", "bf16")
_NP_DTYPES = {ov.Type.f32: np.dtype(np.float32), ov.Type.f16: np.dtype(np.float16)}


def compile_options(precision: str, threads: int) -> dict[str, Any]:
    """How the runner compiles a model for the CPU, at ``precision`` (one of :data:`PRECISIONS`); the export
    check compiles its probe graph the same way."""
    return {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",  # one stream: a batch is one request, its threads share the cores
        "NUM_STREAMS": 1,
    }


def compile_onnx(source: bytes, precision: str, threads: int) -> Any:
    """A serialized ONNX graph compiled as the runner compiles its model (the export check runs its probe graph,
    the model with extra outputs, this way)."""
    core = ov.Core()
    return core.compile_model(core.read_model(source, b""), "CPU", compile_options(precision, threads))


class OpenVinoRunner:
    """Runs an exported Mask2Former graph in OpenVINO on the CPU: ``run(pixel_values) -> (class_logits,
    mask_logits)``.

    Args:
        path: the ``.onnx`` file.
        threads: inference threads (default: the cores available to this process).
        precision: OpenVINO's inference precision hint, "f32" or "bf16".
        cache_dir: OpenVINO's compiled-model cache (default: none), so that later starts skip compiling.
    """

    name = "openvino"

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        precision: str = "f32",
        cache_dir: str | Path | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        self.sha256 = file_sha256(self.path)
        self.threads = threads or available_cpus()
        self.precision = precision
        self.cache_dir = cache_dir
        self.metadata = read_metadata(self.path)
        self.config: Mask2FormerConfig = self.metadata.to_config()
        core = ov.Core()
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        model = core.read_model(str(self.path))
        inp = model.inputs[0]
        self.output_names = [o.get_any_name() for o in model.outputs]
        if inp.get_any_name() != self.metadata.input_name or self.output_names != list(self.metadata.output_names):
            raise ValueError(f"graph inputs/outputs {inp.get_any_name()}/{self.output_names} do not match its metadata")
        shape = tuple(
            d.get_length() if d.is_static else name
            for d, name in zip(inp.get_partial_shape(), self.metadata.input_shape, strict=True)
        )
        dtype = _NP_DTYPES.get(inp.get_element_type())
        if dtype is None:
            raise ValueError(f"unsupported input type {inp.get_element_type()}")
        self.input = InputSpec(inp.get_any_name(), shape, dtype)
        self.compiled = core.compile_model(model, "CPU", compile_options(precision, self.threads))
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request runs one inference at a time

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) normalized, padded images -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4),
        both float32."""
        x = self.input.check(pixel_values)
        with self._lock:
            results = self._request.infer({0: x})
            # Copies: the request's output buffers are reused by its next inference.
            class_logits, mask_logits = (np.array(results[o], dtype=np.float32) for o in self.compiled.outputs)
        return class_logits, mask_logits

    def warmup(self, height: int | None = None, width: int | None = None) -> None:
        """One run on :meth:`InputSpec.warmup_batch`."""
        self.run(self.input.warmup_batch(self.config, height, width))

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (for logs, /readyz, model listings)."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "model": self.metadata.name,
            "source_sha256": self.metadata.source_sha256,
            "quantization": self.metadata.quantization or None,
            "input": {"name": self.input.name, "shape": list(self.input.shape), "dtype": str(self.input.dtype)},
            "threads": self.threads,
            "runtime": f"openvino {ov.__version__}",
            "precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
        }
