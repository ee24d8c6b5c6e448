"""int8 graphs for the CPU: dynamic quantization, and weights stored so that every x86-64 CPU computes them
exactly.

ONNX Runtime's dynamic quantization gives every MatMul with a constant weight int8 weights (symmetric, one
scale per output channel) and quantizes its activations to uint8 at run time (``DynamicQuantizeLinear`` ->
``MatMulInteger``). How the CPU then multiplies uint8 by int8 matters:

- with VNNI (AVX512-VNNI, AVX-VNNI, AMX) the u8 x s8 products are summed in int32: exact;
- without it (AVX2, AVX-512F/BW, SSE4.1: most AMD EPYC before Zen 4, Intel before Cascade Lake),
  ``VPMADDUBSW`` sums *pairs* of products into int16 with saturation (255 x 127 x 2 = 64770 > 32767): on the
  demo model 5.3% of all MatMulInteger outputs come out wrong (up to 44% of one layer's), the exporter's
  check fails and PQ moves by 2 points (bench/int8_saturation.py, BENCHMARKS.md).

ONNX Runtime multiplies uint8 by *uint8* exactly on every x86 CPU (it widens to int16 before it adds). So
the weights are quantized as int8 and then stored as uint8 with 128 added to them and to their zero
points: ``(a - a_zp) * ((w + 128) - (w_zp + 128))`` is the same integer as ``(a - a_zp) * (w - w_zp)``,
and the file is exact wherever it runs, with the accuracy of symmetric 8-bit weights (7-bit weights,
ONNX Runtime's ``reduce_range``, cannot saturate either but moved the demo's PQ by 1.5 points).
:func:`store_weights` converts either way; the runner uses it to go back to int8 on VNNI CPUs (faster
there, still exact) and to rescue files written before this, whose int8 weights saturate.

This module is the int8 part of the file format, shared by the exporter (``model_export.int8`` quantizes) and
the ONNX Runtime runner (which converts the stored weights for its CPU). Needs ``onnx`` and numpy, and
onnxruntime where it measures (no torch).
"""

from __future__ import annotations

import functools
import platform
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHT_DTYPES = ("uint8", "int8")
# What the metadata says of an int8 export (ExportMetadata.quantization_info).
INFO = {
    "method": "onnxruntime dynamic quantization: MatMul weights per output channel, activations uint8 at run time",
    "weights": "uint8",
    "weight_encoding": "int8 symmetric per output channel, stored as uint8 with +128 on weights and zero points",
    "reason": (
        "ONNX Runtime's u8 x s8 kernels saturate int16 pair sums on x86 CPUs without VNNI (AVX2, AVX-512F/BW); "
        "u8 x u8 is exact on every x86 CPU; the runner converts back to int8 where the CPU has VNNI"
    ),
}


def integer_matmul_weights(model: Any) -> dict[str, str]:
    """Names of the initializers that are ``MatMulInteger`` weights (input 1) or weight zero points (input 3),
    each with the element type it is stored as ("uint8"/"int8")."""
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulInteger":
            continue
        for index in (1, 3):
            name = node.input[index] if len(node.input) > index else ""
            if name in inits:
                found[name] = onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type).name
    return found


def store_weights(model: Any, dtype: str) -> int:
    """Store every ``MatMulInteger`` weight and weight zero point of ``model`` (an ``onnx.ModelProto``, changed
    in place) as ``dtype`` ("uint8" or "int8"), shifting by 128 so that every product stays the same integer
    (int8 -128..127 <-> uint8 0..255). A weight without a zero point gets one. Returns how many initializers
    changed. Refuses (ValueError) a graph where another kind of node also reads a weight: shifting it would
    change that node's result."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    target = np.dtype(dtype)
    inits = {i.name: i for i in model.graph.initializer}
    integer_matmuls = [n for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1] in inits]
    for node in integer_matmuls:
        if len(node.input) < 4 or not node.input[3]:  # no zero point means 0 in the weight's type: make it explicit
            weight = inits[node.input[1]]
            zero = numpy_helper.from_array(
                np.zeros((), onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)), f"{weight.name}_zero_point"
            )
            model.graph.initializer.append(zero)
            inits[zero.name] = model.graph.initializer[-1]
            node.input.extend([""] * (4 - len(node.input)))
            node.input[3] = zero.name
    weights = integer_matmul_weights(model)
    for node in model.graph.node:
        others = node.input[0::2] if node.op_type == "MatMulInteger" else node.input
        if shared := set(others) & set(weights):
            raise ValueError(f"{node.op_type} node {node.name!r} also reads MatMulInteger weights {sorted(shared)}")
    changed = 0
    for name, stored in weights.items():
        if stored == dtype:
            continue
        array = numpy_helper.to_array(inits[name]).astype(np.int16)
        shifted = array + 128 if target == np.uint8 else array - 128
        inits[name].CopyFrom(numpy_helper.from_array(shifted.astype(target), name))
        changed += 1
    return changed


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@functools.cache
def cpu_int8_kernel() -> str:
    """How ONNX Runtime's CPU provider multiplies uint8 activations by int8 weights on this machine, measured:
    one ``MatMulInteger`` whose u8 x s8 pair sums (255 x 127 x 2) do not fit in int16.

    "vnni": exact on x86 (int32 sums: AVX512-VNNI, AVX-VNNI, AMX). "saturating": wrong, the int16 pair sums
    of VPMADDUBSW (x86 without VNNI). "exact": exact on another architecture. Measured rather than read from
    the CPU flags, so that it is right under emulators and hypervisors that hide or fake flags, and for the
    kernels this ONNX Runtime version picks."""
    import onnxruntime as ort  # lazy: onnxruntime (the exporter imports this module; float exports run without it)

    rows, depth, cols = 16, 64, 16  # a GEMM (not a vector product), weights constant as in our graphs
    weight = numpy_helper.from_array(np.full((depth, cols), 127, np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, depth])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, cols])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION, 9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"a": np.full((rows, depth), 255, np.uint8)})
    if not np.all(y == 255 * 127 * depth):
        return "saturating"
    return "vnni" if platform.machine().lower() in _X86 else "exact"


def integer_matmul_errors(model: Any, inputs: dict[str, np.ndarray]) -> list[tuple[str, int, int, float]]:
    """Run ``model`` (an int8 ``onnx.ModelProto``) in ONNX Runtime on this CPU and compare every
    ``MatMulInteger``'s int32 output with the exact product of the same inputs (numpy, int64).

    Returns one row per MatMulInteger: (node name, wrong entries, entries, largest error / largest |exact|).
    Graph optimizations are off so that every MatMulInteger runs as itself, through the same kernel as in
    the optimized graph."""
    import onnxruntime as ort  # lazy: onnxruntime (the exporter imports this module; float exports run without it)

    nodes = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    names = list(dict.fromkeys(name for n in nodes for name in n.input[:1] + n.input[2:3] + n.output[:1] if name))
    names = [name for name in names if name not in weights]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = {**weights, **dict(zip(names, session.run(names, inputs)))}
    rows = []
    for node in nodes:
        a, w = values[node.input[0]].astype(np.int64), values[node.input[1]].astype(np.int64)
        a_zp = values[node.input[2]].astype(np.int64) if len(node.input) > 2 and node.input[2] else 0
        w_zp = values[node.input[3]].astype(np.int64) if len(node.input) > 3 and node.input[3] else 0
        exact = np.matmul(a - a_zp, w - w_zp)
        err = np.abs(values[node.output[0]].astype(np.int64) - exact)
        rows.append((node.name, int((err > 0).sum()), err.size, float(err.max()) / max(1, int(np.abs(exact).max()))))
    return rows
