"""int8 export: ONNX Runtime's dynamic quantization of a float32 export, its weights stored as uint8 so that
every x86-64 CPU computes them exactly (why: :mod:`model_format.int8`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import onnx

from model_export.graph import save
from model_format.int8 import INFO, store_weights
from model_format.metadata import ExportMetadata, read_metadata, write_metadata


def quantize_dynamic_int8(path: Path) -> Any:
    """ONNX Runtime's dynamic quantization of the graph at ``path`` with the weights stored as uint8
    (:func:`store_weights`); returns the quantized ``onnx.ModelProto`` (standard ops only).

    First ONNX Runtime's quantization pre-processing (its basic, hardware-independent graph optimizations
    and ONNX shape inference): it folds weights that the graph derives from initializers (the slices of
    the decoder's fused in-projection, the sampling-offset projection scaled by the level sizes) into
    constants, so that those MatMuls get int8 weights too."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # lazy: onnxruntime (float exports run without)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # lazy: onnxruntime (as above)

    external = path.with_name(path.name + ".data").is_file()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / path.name
        # Symbolic shape inference is for transformer graphs it knows; it fails on this one (and ONNX's own
        # shape inference is enough for dynamic quantization).
        quant_pre_process(path, prepared, skip_symbolic_shape=True, save_as_external_data=external)
        quantize_dynamic(
            prepared,
            quantized,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            use_external_data_format=external,
        )
        model = onnx.load(str(quantized))
    store_weights(model, "uint8")
    return model


def quantize_export(path: Path, meta: ExportMetadata | None = None) -> tuple[Any, ExportMetadata]:
    """Quantize the float32 export at ``path`` in place (:func:`quantize_dynamic_int8`), its metadata (``meta``,
    else read from the file) carried over and marked int8 (``quantization="int8-dynamic"``, :data:`INFO`);
    returns what it saved: the ``onnx.ModelProto`` and that metadata."""
    meta = read_metadata(path) if meta is None else meta
    meta = dataclasses.replace(meta, quantization="int8-dynamic", quantization_info=dict(INFO))
    proto = quantize_dynamic_int8(path)
    write_metadata(proto, meta)
    save(proto, path)
    return proto, meta
