"""Facts about an ONNX graph, the rewrites the exporter applies to it, and how it is written to disk.

- facts: the type of every float tensor (:func:`float_tensor_types`: the scan for float64 and other foreign
  types), how often each op occurs (:func:`op_types`), the shape of an input or output (:func:`value_shape`);
- rewrites: readable names for the dynamic axes (:func:`name_dynamic_axes`), float16 comparisons kept in
  float16 (:func:`compare_in_float16`);
- files: :func:`save` (external data past protobuf's 2 GB limit), :func:`file_size`, :func:`set_aside` (a
  graph that failed its check is renamed so that nobody serves it).

Imports onnx, not torch.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

LARGE_MODEL_BYTES = 2**31 - 2**24  # protobuf's 2 GB limit, with room for the graph itself
FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}  # onnx.TensorProto values


# ---------------------------------------------------------------------------------------------- facts
def _subgraphs(graph: Any) -> Iterator[Any]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                yield from _subgraphs(attr.g)
            for g in attr.graphs:
                yield from _subgraphs(g)


def float_tensor_types(model: Any) -> dict[str, str]:
    """{tensor name: float type} for every float tensor of the graph, after ONNX shape inference.

    Covers graph inputs/outputs, every inferred intermediate (``value_info``), initializers, ``Constant``
    values, ``Cast``/``ConstantOfShape``/``EyeLike``/random-op target types, in subgraphs too. A name
    ``node:<op>#i`` stands for a type written in a node attribute.
    """
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True) if model.ByteSize() < 2**31 else model
    found: dict[str, str] = {}
    for g in _subgraphs(inferred.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            code = vi.type.tensor_type.elem_type
            if code in FLOAT_TYPES:
                found[vi.name] = FLOAT_TYPES[code]
        for t in g.initializer:
            if t.data_type in FLOAT_TYPES:
                found[t.name] = FLOAT_TYPES[t.data_type]
        for i, node in enumerate(g.node):
            for attr in node.attribute:
                code = None
                if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT:
                    code = attr.i
                elif attr.type == onnx.AttributeProto.TENSOR:
                    code = attr.t.data_type
                if code in FLOAT_TYPES:
                    found[f"node:{node.op_type}#{i}.{attr.name}"] = FLOAT_TYPES[code]
    return found


def op_types(model: Any) -> dict[str, int]:
    """How often each op type occurs (subgraphs included), keyed ``domain::Op`` outside the default domain."""
    counts: Counter[str] = Counter()
    for g in _subgraphs(model.graph):
        for node in g.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
    return dict(counts)


def value_shape(vi: Any) -> tuple[int | str, ...]:
    """The shape of a graph input/output (``ValueInfoProto``): ints, and names for dynamic axes."""
    return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)


# ---------------------------------------------------------------------------------------------- rewrites
def name_dynamic_axes(model: Any) -> None:
    """Rename the exporter's symbols (``s0``, ``s77``...) to ``batch``/``height``/``width`` everywhere."""
    names = {}
    for axis, name in zip(model.graph.input[0].type.tensor_type.shape.dim, ("batch", "channels", "height", "width")):
        if axis.dim_param:
            names[axis.dim_param] = name
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for g in _subgraphs(model.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = pattern.sub(lambda m: names[m.group(1)], d.dim_param)


def compare_in_float16(model: Any) -> int:
    """Let comparisons that PyTorch's decompositions upcast to float32 compare the float16 values directly.

    ``a >= b`` on float16 tensors is traced as ``Cast(a, float32) >= Cast(b, float32)``; float16 -> float32
    is exact, so comparing the float16 values gives the same booleans bit for bit, and no float32 tensor is
    left in a float16 graph. Float32 constants that float16 represents exactly are converted. Returns the
    number of comparisons rewritten.
    """
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.graph.value_info, *graph.input]}
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {t.name: t for t in graph.initializer}

    def as_float16(name: str) -> str | None:
        node = producer.get(name)
        if node is not None and node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if to == TensorProto.FLOAT and types.get(node.input[0]) == TensorProto.FLOAT16:
                return node.input[0]
        if name in initializers and initializers[name].data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(initializers[name])
            if np.array_equal(value.astype(np.float16).astype(np.float32), value):
                fp16_name = name + "_float16"
                if fp16_name not in initializers:
                    initializers[fp16_name] = numpy_helper.from_array(value.astype(np.float16), fp16_name)
                    graph.initializer.append(initializers[fp16_name])
                return fp16_name
        return None

    rewritten = 0
    for node in graph.node:
        if node.op_type in ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"):
            narrowed = [as_float16(i) for i in node.input]
            if all(narrowed):
                node.input[:] = narrowed
                rewritten += 1
    _remove_unused(graph)
    return rewritten


def _remove_unused(graph: Any) -> None:
    """Drop nodes, initializers and ``value_info`` nothing reads (the graph is topologically sorted)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # names captured by subgraphs
                for sub in [attr.g, *attr.graphs]:
                    needed.update(i for n in sub.node for i in n.input)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    produced = {o for n in kept for o in n.output}
    value_info = [vi for vi in graph.value_info if vi.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


# ---------------------------------------------------------------------------------------------- files
def set_aside(path: Path) -> Path:
    """Rename a graph that failed its check to ``<name>.failed.onnx`` so that nobody serves it by mistake."""
    failed = path.with_name(path.name + ".failed.onnx")
    os.replace(path, failed)
    return failed


def save(proto: Any, path: Path) -> None:
    """Write ``proto`` to ``path``; past protobuf's 2 GB limit with its tensors in ``<name>.data`` beside it."""
    if proto.ByteSize() > LARGE_MODEL_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))


def file_size(path: Path) -> int:
    """Bytes of a saved graph, its external-data file included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
