"""model_format.int8 on small hand-made graphs: storing MatMulInteger weights as uint8 or int8 keeps every
product, and the runner's choice of weight type per CPU. (The real int8 export: tests/test_onnx_export.py.)"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from model_format.int8 import (  # noqa: E402
    cpu_int8_kernel,
    integer_matmul_errors,
    integer_matmul_weights,
    store_weights,
)
from runtimes.onnx_runner import int8_weights_to_run  # noqa: E402

CPU = ["CPUExecutionProvider"]


def graph(zero_point: bool = True, shared_with: str | None = None) -> onnx.ModelProto:
    """x (4, 32) float -> DynamicQuantizeLinear -> MatMulInteger with int8 weights w (32, 8) -> y int32.
    ``shared_with``: another op type that also reads ``w``."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (32, 8)).astype(np.int8), "w")
    zp = numpy_helper.from_array(np.zeros(8, np.int8), "w_zp")
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "x_scale", "x_zp"]),
        helper.make_node("MatMulInteger", ["xq", "w", "x_zp", "w_zp"] if zero_point else ["xq", "w"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])]
    if shared_with:
        nodes.append(helper.make_node(shared_with, ["w"], ["w_copy"]))
        outputs.append(helper.make_tensor_value_info("w_copy", TensorProto.INT8, [32, 8]))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        outputs,
        [w, zp] if zero_point else [w],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=CPU).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("zero_point", [True, False])
def test_storing_weights_as_uint8_and_back_keeps_every_product(zero_point):
    model = graph(zero_point)
    x = np.random.default_rng(1).normal(0, 1, (4, 32)).astype(np.float32)
    as_int8 = run(model, x)
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    assert store_weights(model, "uint8") == 2
    assert set(integer_matmul_weights(model).values()) == {"uint8"}
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    np.testing.assert_array_equal(w.astype(np.int16) - 128, original["w"])
    # The exact products (u8 x u8 is exact on every CPU; the int8 graph's are where the CPU has VNNI).
    assert [row[1] for row in integer_matmul_errors(model, {"x": x})] == [0]
    if cpu_int8_kernel() != "saturating":
        np.testing.assert_array_equal(run(model, x), as_int8)

    assert store_weights(model, "int8") == 2 and store_weights(model, "int8") == 0
    back = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(back["w"], original["w"])
    np.testing.assert_array_equal(run(model, x), as_int8)  # the original graph again


def test_a_weight_another_op_reads_is_refused():
    with pytest.raises(ValueError, match="Identity node .* also reads MatMulInteger weights"):
        store_weights(graph(shared_with="Identity"), "uint8")
    with pytest.raises(ValueError, match="dtype"):
        store_weights(graph(), "int4")


def test_cpu_int8_kernel_is_measured():
    kernel = cpu_int8_kernel()
    assert kernel in ("vnni", "saturating", "exact")
    # The probe's own claim, checked on a weight range that saturates VPMADDUBSW: 255 * 127 * 2 > 2**15.
    model = graph()
    w = next(i for i in model.graph.initializer if i.name == "w")
    w.CopyFrom(numpy_helper.from_array(np.full((32, 8), 127, np.int8), "w"))
    x = np.full((4, 32), 1.0, np.float32)  # quantizes to 255 with zero point 0
    exact = run(model, x) == 255 * 127 * 32
    assert exact.all() == (kernel != "saturating")
    store_weights(model, "uint8")
    assert (run(model, x) == 255 * 127 * 32).all()  # u8 x u8: exact on every CPU


@pytest.mark.parametrize(
    ("stored", "kernel", "providers", "expected"),
    [
        ("uint8", "vnni", CPU, "int8"),
        ("uint8", "saturating", CPU, "uint8"),
        ("int8", "saturating", CPU, "uint8"),  # a file from before uint8 storage, rescued
        ("int8", "vnni", CPU, "int8"),
        ("int8", "exact", CPU, "int8"),  # not x86: as stored
        ("uint8", "exact", CPU, "uint8"),
        ("int8", "saturating", ["CUDAExecutionProvider", *CPU], "int8"),  # other providers: as stored
        ("", "saturating", CPU, ""),  # not an int8 graph
    ],
)
def test_int8_weights_to_run(stored, kernel, providers, expected):
    assert int8_weights_to_run(stored, kernel, providers) == expected
