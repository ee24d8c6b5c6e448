"""ONNX Runtime runner for a graph written by ``m2f export onnx``; serves from the ``.onnx`` file alone.

No torch on this path: labels, thing/stuff flags, preprocessing and thresholds come from the file's
metadata (:mod:`model_format.metadata`), inputs and outputs are numpy arrays.

Sessions are opened as :mod:`runtimes.ort_session` says (every graph optimization but the CPU fusions that
slow these graphs down, one intra-op thread per usable core) and, with a ``cache_dir``,
keep the optimized graph on disk keyed by the model file's SHA-256 (plus the ONNX Runtime version, the
execution providers and the CPU kind, since an optimized graph is specific to the hardware it was made
on), so that later starts skip the optimization passes.

int8 graphs store their MatMul weights as uint8 (exact on every CPU, see :mod:`model_format.int8`); on an
x86 CPU with VNNI the runner converts them to int8 as it loads (the same integer products, a faster kernel),
and files from older exports, whose int8 weights saturate on CPUs without VNNI, to uint8 there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from model_format.int8 import WEIGHT_DTYPES, cpu_int8_kernel, store_weights
from model_format.metadata import file_sha256, read_metadata
from pipeline.config import Mask2FormerConfig
from runtimes.ort_session import available_cpus, disabled_optimizers, hardware_tag, open_session, session_options
from runtimes.runner import InputSpec

log = logging.getLogger(__name__)

_NP_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


def int8_weights_to_run(stored: str, kernel: str | None, providers: list[str]) -> str:
    """The element type to run an int8 graph's MatMul weights as ("" for a graph without them), given how
    the file stores them (ExportMetadata.int8_weights) and this CPU's int8 kernel (:func:`cpu_int8_kernel`).

    On the CPU provider of an x86 CPU: int8 where it has VNNI (exact there, and faster than uint8:
    bench/int8_weights.py); uint8 where it has not (ONNX Runtime's u8 x s8 kernel saturates without VNNI,
    u8 x u8 is exact; model_format.int8), which also rescues files exported with int8 weights before they
    were stored as uint8. Other CPUs and providers: as stored. Converting is exact: the integer products do
    not change."""
    if not stored or providers != ["CPUExecutionProvider"] or kernel == "exact":
        return stored
    return "int8" if kernel == "vnni" else "uint8"


class OnnxRunner:
    """Runs an exported Mask2Former graph: ``run(pixel_values) -> (class_logits, mask_logits)``.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: the cores available to this process).
        cache_dir: where to keep the optimized graph (default: no caching).
        providers: ONNX Runtime execution providers (default: CPU).
        int8_weights: for int8 graphs, run the MatMul weights as "uint8" or "int8" whatever this CPU is
            (default: :func:`int8_weights_to_run` picks the fastest exact one; "int8" without VNNI saturates).
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        providers: list[str] | None = None,
        int8_weights: str | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        self.sha256 = file_sha256(self.path)
        self.threads = threads or available_cpus()
        self.providers = providers or ["CPUExecutionProvider"]
        self.cache_path: Path | None = None
        self.cache_hit = False
        self.metadata = read_metadata(self.path)
        self.config: Mask2FormerConfig = self.metadata.to_config()
        # int8 graphs: which weight type runs fastest exactly on this CPU (the file's, or converted at load).
        # The kernel probe (a one-op session) only runs for them.
        self.int8_kernel = cpu_int8_kernel() if self.metadata.int8_weights else None
        self.int8_weights = int8_weights_to_run(self.metadata.int8_weights, self.int8_kernel, self.providers)
        if int8_weights is not None:
            if not self.metadata.int8_weights or int8_weights not in WEIGHT_DTYPES:
                raise ValueError(f"int8_weights={int8_weights!r}: give one of {WEIGHT_DTYPES} for an int8 graph")
            self.int8_weights = int8_weights
        try:
            self.session = self._open(cache_dir)
        except Exception as e:  # ONNX Runtime's own error types are not importable classes
            if "is not a registered function/op" in str(e) and ("trt.plugins" in str(e) or "m2f:" in str(e)):
                raise ValueError(
                    f"{self.path} has TensorRT plugin nodes (exported with --plugins): ONNX Runtime cannot serve "
                    "it; export without --plugins for ONNX Runtime"
                ) from None
            raise
        inp = self.session.get_inputs()[0]
        self.input = InputSpec(
            inp.name, tuple(d if isinstance(d, int) else str(d) for d in inp.shape), _dtype(inp.type)
        )
        self.output_names = [o.name for o in self.session.get_outputs()]
        expected = list(self.metadata.output_names)
        if inp.name != self.metadata.input_name or self.output_names != expected:
            raise ValueError(f"graph inputs/outputs {inp.name}/{self.output_names} do not match its metadata")

    # ------------------------------------------------------------------ sessions
    def _options(self) -> ort.SessionOptions:
        return session_options(self.threads)

    def _source(self) -> str | bytes:
        """The graph to open: the file, or a copy with its int8 weights stored as ``self.int8_weights`` when that
        differs from the file (the same integer products through another ONNX Runtime kernel)."""
        if self.int8_weights == self.metadata.int8_weights:
            return str(self.path)
        model = onnx.load(str(self.path))
        store_weights(model, self.int8_weights)
        log.info(
            "%s: int8 weights stored as %s, run as %s (CPU int8 kernel: %s)",
            self.path,
            self.metadata.int8_weights,
            self.int8_weights,
            self.int8_kernel,
        )
        return model.SerializeToString()

    def _open(self, cache_dir: str | Path | None) -> ort.InferenceSession:
        if cache_dir is None:
            return open_session(self._source(), self._options(), self.providers)
        cache_dir = Path(cache_dir)
        tag = re.sub(r"[^A-Za-z0-9]+", "", "-".join(p.replace("ExecutionProvider", "") for p in self.providers))
        if disabled := disabled_optimizers(self.providers):  # the cached graph is optimized without these
            tag += "-no" + hashlib.sha256(",".join(disabled).encode()).hexdigest()[:6]
        if self.int8_weights != self.metadata.int8_weights:
            tag += f"-w{self.int8_weights}"
        self.cache_path = cache_dir / f"{self.sha256[:32]}-ort{ort.__version__}-{tag}-{hardware_tag()}.onnx"
        if self.cache_path.is_file():
            try:
                session = open_session(str(self.cache_path), self._options(), self.providers)
                self.cache_hit = True
                return session
            except Exception as e:  # a stale or truncated cache entry: rebuild it
                log.warning("ignoring optimized-model cache %s: %s", self.cache_path, e)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=cache_dir)
            os.close(fd)
        except OSError as e:
            log.warning("optimized-model cache %s not writable (%s); running without it", cache_dir, e)
            return open_session(self._source(), self._options(), self.providers)
        opts = self._options()
        opts.optimized_model_filepath = tmp
        opts.log_severity_level = 3  # not the "hardware specific" warning: the cache key has the CPU kind
        try:
            session = open_session(self._source(), opts, self.providers)
            os.replace(tmp, self.cache_path)  # atomic: concurrent replicas never read a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return session

    # ------------------------------------------------------------------ running
    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) normalized, padded images -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4),
        both float32."""
        x = self.input.check(pixel_values)
        class_logits, mask_logits = self.session.run(self.output_names, {self.input.name: x})
        return class_logits.astype(np.float32, copy=False), mask_logits.astype(np.float32, copy=False)

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
            "int8_weights": self.int8_weights or None,  # as run: see int8_weights_to_run
            "cpu_int8_kernel": self.int8_kernel,  # int8 graphs only
            "input": {"name": self.input.name, "shape": list(self.input.shape), "dtype": str(self.input.dtype)},
            "threads": self.threads,
            "providers": self.session.get_providers(),
            "optimized_cache": str(self.cache_path) if self.cache_path else None,
            "cache_hit": self.cache_hit,
        }


def _dtype(onnx_type: str) -> np.dtype:
    if onnx_type not in _NP_DTYPES:
        raise ValueError(f"unsupported input type {onnx_type}")
    return _NP_DTYPES[onnx_type]
