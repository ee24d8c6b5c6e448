"""int8 export: ONNX Runtime's dynamic quantization of a float32 export, its weights stored as uint8 so that
every x86-64 CPU computes them exactly (why: :mod:`model_format.int8`).
"""

from __future__ import annotations

import ast
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import onnx

from model_export.graph import save
from model_format.int8 import INFO, store_weights
from model_format.metadata import ExportMetadata, read_metadata, write_metadata

# The modules whose MatMuls int8 leaves in float32, as the exporter records them per node: everything that
# makes the masked-attention masks and the outputs. The pixel decoder makes the mask features (every layer's
# attention mask and the mask output are products with them), the mask head the mask embeddings, the class
# head the scores. The backbone and the decoder layers are quantized (bench/int8_sensitivity.py, BENCHMARKS.md).
FLOAT_MODULES = ("model.pixel_decoder", "model.decoder.mask_head", "model.decoder.class_head")
_SCOPES = "pkg.torch.onnx.name_scopes"  # torch.onnx's per-node record of the module path it came from


def node_modules(model: Any) -> dict[str, str]:
    """Node name -> the path of the module it was traced in (``model.pixel_decoder.encoder.layers.0.fc1``), as
    ``torch.onnx`` records it in each node's metadata; nodes without a record are left out."""
    modules = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == _SCOPES:
                scopes = ast.literal_eval(prop.value)  # ['', 'model', ..., 'model.x.y', 'op_name']
                modules[node.name] = scopes[-2] if len(scopes) > 1 else ""
    return modules


def float_matmuls(prepared: Any, source: Any, modules: tuple[str, ...] = FLOAT_MODULES) -> list[str]:
    """The MatMul/Gemm nodes with a constant weight in ``prepared`` (the :func:`prepare`-d graph) that int8
    leaves in float32: those traced in one of ``modules`` according to ``source``, the float32 export they came
    from (ONNX Runtime's pre-processing drops the records but keeps each node's name before a ``/``).

    Refuses (ValueError) a source without module records, rather than quantizing the heads."""
    scope = node_modules(source)
    if not scope:
        raise ValueError("the float32 graph has no module records (torch.onnx name scopes): cannot tell its heads")
    weights = {i.name for i in prepared.graph.initializer}
    prefixes = tuple(m + "." for m in modules)
    keep = []
    for node in prepared.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
            module = scope.get(node.name.split("/")[0], "")
            if module in modules or module.startswith(prefixes):
                keep.append(node.name)
    return keep


def prepare(path: Path, prepared: Path) -> Path:
    """ONNX Runtime's quantization pre-processing of the float32 graph at ``path``, written to ``prepared``: its
    basic, hardware-independent graph optimizations and ONNX shape inference. It folds weights that the graph
    derives from initializers (the slices of the decoder's fused in-projection, the sampling-offset projection
    scaled by the level sizes) into constants, so that those MatMuls get int8 weights too."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # lazy: onnxruntime (int8 only)

    external = path.with_name(path.name + ".data").is_file()
    # Symbolic shape inference is for transformer graphs it knows; it fails on this one (and ONNX's own
    # shape inference is enough for dynamic quantization).
    quant_pre_process(path, prepared, skip_symbolic_shape=True, save_as_external_data=external)
    return prepared


def quantize_prepared(prepared: Path, keep_float: list[str]) -> Any:
    """ONNX Runtime's dynamic quantization of the :func:`prepare`-d graph: int8 weights per output channel for
    every MatMul/Gemm with a constant weight except the nodes named in ``keep_float``, stored as uint8
    (:func:`store_weights`); returns the ``onnx.ModelProto`` (standard ops only)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # lazy: onnxruntime (float exports run without)

    external = prepared.with_name(prepared.name + ".data").is_file()
    # The quantizer turns a Gemm into a MatMul named <name>_MatMul (and an Add) before it looks at the names.
    exclude = [name for node in keep_float for name in (node, f"{node}_MatMul")]
    with tempfile.TemporaryDirectory(dir=prepared.parent) as tmp:
        quantized = Path(tmp) / prepared.name
        quantize_dynamic(
            prepared,
            quantized,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            nodes_to_exclude=exclude,
            use_external_data_format=external,
        )
        model = onnx.load(str(quantized))
    store_weights(model, "uint8")
    return model


def quantize_dynamic_int8(path: Path) -> tuple[Any, list[str]]:
    """The int8 graph of the float32 export at ``path`` (:func:`prepare`, then :func:`quantize_prepared` with
    :func:`float_matmuls` kept float: mixed precision): the ``onnx.ModelProto`` and the names of the MatMuls
    left in float32."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        prepared = prepare(path, Path(tmp) / path.name)
        source = onnx.load(str(path), load_external_data=False)
        keep = float_matmuls(onnx.load(str(prepared), load_external_data=False), source)
        return quantize_prepared(prepared, keep), keep


def quantize_export(path: Path, meta: ExportMetadata | None = None) -> tuple[Any, ExportMetadata]:
    """Quantize the float32 export at ``path`` in place (:func:`quantize_dynamic_int8`), its metadata (``meta``,
    else read from the file) carried over and marked int8 (``quantization="int8-dynamic"``, :data:`INFO` and what
    stayed float32); returns what it saved: the ``onnx.ModelProto`` and that metadata."""
    meta = read_metadata(path) if meta is None else meta
    proto, keep = quantize_dynamic_int8(path)
    # What stayed float32: the modules (FLOAT_MODULES) and how many MatMuls of the graph they hold.
    info = {**INFO, "float_modules": list(FLOAT_MODULES), "float_matmuls": len(keep)}
    meta = dataclasses.replace(meta, quantization="int8-dynamic", quantization_info=info)
    write_metadata(proto, meta)
    save(proto, path)
    return proto, meta
