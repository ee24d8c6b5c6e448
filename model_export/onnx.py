"""Mask2Former -> ONNX, checked against PyTorch before it is handed over.

:func:`export_onnx` traces the model with ``torch.export`` (the exporter behind
``torch.onnx.export(..., dynamo=True)``), converts it to ONNX with standard ops only (masked attention is
MatMul/Softmax with an additive mask, MSDeformAttn is ``GridSample``), writes the runtime metadata (see
:mod:`model_export.metadata`), then checks the written file: ``onnx.checker``, a scan that every float
tensor has the export dtype (no float64 anywhere), and a run in ONNX Runtime compared with PyTorch on test
inputs. The check fails the export when the difference is over the tolerance.

Masked attention thresholds each layer's mask logits at 0, so a logit within rounding of 0 can fall on
either side in two correct implementations and change what that query attends to; after such a flip the
two outputs legitimately differ. The check therefore also reads, out of ONNX Runtime, the boolean
attention mask each decoder layer actually used and the mask logits (at the layer's level) it came from,
and compares both with PyTorch's: outputs are compared in full only when no mask bit flipped; a flip is
reported, accepted only where the logit is within the tolerance of 0, and then the mask logits up to the
flip are compared instead. Nothing is loosened to absorb it.

With ``plugins=True`` (``m2f export onnx --plugins``, for TensorRT) multi-scale deformable attention and masked
attention are exported as custom-domain plugin nodes instead (:mod:`model_export.plugins`); the op scan then
allows exactly those two, one per encoder / decoder layer, and the check runs the graph in ONNX Runtime with
the plugin nodes implemented on the CPU by our reference code (:mod:`model_export.plugins.ort_reference`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mask2former.config import Mask2FormerConfig
from mask2former.mask2former import Mask2Former
from mask2former.transformer_decoder import attention_mask_at_level
from model_export import int8
from model_export.metadata import INPUT_NAME, OUTPUT_NAMES, ExportMetadata, file_sha256, write_metadata

DEFAULT_OPSET = 20  # torch 2.13's default; GridSample needs >= 16, the torch.export-based exporter >= 18
MIN_OPSET, MAX_OPSET = 18, 23
# Max |ONNX Runtime - PyTorch| allowed, relative to max |PyTorch| of each output.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
# With int8 weights the outputs move by a few percent of their range (mask-logit signs near 0 flip and then
# whole queries attend elsewhere), so the check is a sanity bound that catches a broken graph; the accuracy
# that matters is measured as ΔPQ on the demo set (tests/test_demo_model.py, bench/onnxruntime_vs_eager.py).
INT8_TOLERANCE = 0.1
QUANTIZATIONS = ("int8",)
# Sizes the dynamic-shape check runs at when none are given: one a multiple of 32, one not.
DEFAULT_CHECK_SIZES = ((128, 192), (200, 136))
LARGE_MODEL_BYTES = 2**31 - 2**24  # protobuf's 2 GB limit, with room for the graph itself

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}  # onnx.TensorProto values
_DTYPE_CODE = {"float32": 1, "float16": 10}


class ExportCheckError(RuntimeError):
    """The exported graph failed its check (ONNX checker, dtype scan, or ONNX Runtime vs PyTorch)."""

    def __init__(self, message: str, report: ExportReport | None = None):
        super().__init__(message)
        self.report = report


class OnnxWrapper(nn.Module):
    """The exported module: ``pixel_values`` (B, 3, H, W) -> ``class_logits`` (B, Q, K+1), ``mask_logits``
    (B, Q, ceil(H/4), ceil(W/4)). Fixed names, no auxiliary outputs, no post-processing in the graph."""

    def __init__(self, model: Mask2Former):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values)
        return out.class_logits, out.mask_logits


# ---------------------------------------------------------------------------------------------- report
@dataclass
class CheckResult:
    """ONNX Runtime against PyTorch on one input."""

    input_shape: tuple[int, ...]
    max_abs_diff: dict[str, float]  # per output compared
    max_abs_ref: dict[str, float]
    tolerance: float
    mask_flips: int = 0  # attention-mask entries (query, pixel) that differ between the two
    first_flip_layer: int | None = None  # the first decoder layer whose attention mask differs
    flips_near_zero: bool = True  # every flip sits at a logit within the tolerance of 0
    layers_compared: int = 0  # layers whose mask logits were compared when a flip cut the comparison short
    seconds_onnxruntime: float = 0.0
    seconds_pytorch: float = 0.0

    @property
    def rel_diff(self) -> dict[str, float]:
        return {k: self.max_abs_diff[k] / max(self.max_abs_ref[k], 1e-30) for k in self.max_abs_diff}

    @property
    def passed(self) -> bool:
        return self.flips_near_zero and all(v <= self.tolerance for v in self.rel_diff.values())

    def describe(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        diffs = ", ".join(
            f"{k} max|diff| {self.max_abs_diff[k]:.2e} (rel {self.rel_diff[k]:.1e})" for k in self.max_abs_diff
        )
        text = f"{shape}: {diffs}; {'ok' if self.passed else 'FAILED'} at tolerance {self.tolerance:g}"
        if self.mask_flips:
            where = "all at |logit| within tolerance of 0" if self.flips_near_zero else "NOT all near a 0 logit"
            text += (
                f"; {self.mask_flips} attention-mask entries flipped from decoder layer {self.first_flip_layer}"
                f" ({where}), so the mask logits of layers up to that one were compared instead of the outputs"
            )
        return text


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    opset: int
    dtype: str
    input_shape: tuple[int | str, ...]
    output_shapes: dict[str, tuple[int | str, ...]]
    op_types: dict[str, int]
    tolerance: float
    metadata: ExportMetadata
    checks: list[CheckResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds

    @property
    def checked(self) -> bool:
        return bool(self.checks)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def max_rel_diff(self) -> float:
        return max((v for c in self.checks for v in c.rel_diff.values()), default=float("nan"))

    def summary(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        lines = [
            f"{self.path} ({self.size_bytes / 2**20:.1f} MiB, opset {self.opset}, {self.dtype}, input {shape})",
            f"ops: {', '.join(f'{k} {v}' for k, v in sorted(self.op_types.items()))}",
        ]
        lines += [f"check {c.describe()}" for c in self.checks] or ["not checked against PyTorch"]
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


class _Steps:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total: int, log: Callable[[str], None] | None):
        self.total, self.log, self.n = total, log, 0
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.n += 1
        if self.log:
            self.log(f"[{self.n}/{self.total}] {name} ...")
        t0 = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t0
        if self.log:
            self.log(f"[{self.n}/{self.total}] {name}: done in {self.timings[name]:.1f}s")


# ---------------------------------------------------------------------------------------------- hashing
def checkpoint_files(folder: str | Path) -> list[Path]:
    """The files that define an HF checkpoint: configs and weights (shards included); a detectron2
    checkpoint is its one file."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    names = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names += ["model.safetensors.index.json", *json.loads(index.read_text())["weight_map"].values()]
    return sorted({folder / n for n in names if (folder / n).is_file()})


def checkpoint_sha256(folder: str | Path) -> tuple[str, dict[str, str]]:
    """(combined hash, {file name: sha256}) of a checkpoint folder.

    Each file's hash is what ``sha256sum`` prints; the combined one hashes the sorted ``name  hash`` lines.
    """
    files = {p.name: file_sha256(p) for p in checkpoint_files(folder)}
    lines = "".join(f"{name}  {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest(), files


def module_sha256(model: Mask2Former) -> str:
    """Hash of an in-memory model: its config and every tensor of its state dict."""
    h = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- graph facts
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
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True) if model.ByteSize() < 2**31 else model
    found: dict[str, str] = {}
    for g in _subgraphs(inferred.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            code = vi.type.tensor_type.elem_type
            if code in _FLOAT_TYPES:
                found[vi.name] = _FLOAT_TYPES[code]
        for t in g.initializer:
            if t.data_type in _FLOAT_TYPES:
                found[t.name] = _FLOAT_TYPES[t.data_type]
        for i, node in enumerate(g.node):
            for attr in node.attribute:
                code = None
                if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT:
                    code = attr.i
                elif attr.type == onnx.AttributeProto.TENSOR:
                    code = attr.t.data_type
                if code in _FLOAT_TYPES:
                    found[f"node:{node.op_type}#{i}.{attr.name}"] = _FLOAT_TYPES[code]
    return found


def op_types(model: Any) -> dict[str, int]:
    """How often each op type occurs (subgraphs included), keyed ``domain::Op`` outside the default domain."""
    counts: Counter[str] = Counter()
    for g in _subgraphs(model.graph):
        for node in g.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
    return dict(counts)


def _compare_in_float16(model: Any) -> int:
    """Let comparisons that PyTorch's decompositions upcast to float32 compare the float16 values directly.

    ``a >= b`` on float16 tensors is traced as ``Cast(a, float32) >= Cast(b, float32)``; float16 -> float32
    is exact, so comparing the float16 values gives the same booleans bit for bit, and no float32 tensor is
    left in a float16 graph. Float32 constants that float16 represents exactly are converted. Returns the
    number of comparisons rewritten.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

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


def _shape(vi: Any) -> tuple[int | str, ...]:
    return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)


def _name_dynamic_axes(model: Any) -> None:
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


# ---------------------------------------------------------------------------------------------- export
def _load(model_or_folder: Mask2Former | str | Path) -> tuple[Mask2Former, str, str, dict[str, str]]:
    if isinstance(model_or_folder, nn.Module):
        return model_or_folder, "<in-memory module>", module_sha256(model_or_folder), {}
    from mask2former.weights import load_model

    folder = Path(model_or_folder)
    model = load_model(folder)
    digest, files = checkpoint_sha256(folder)
    return model, str(folder.resolve()), digest, files


def _example_size(cfg: Mask2FormerConfig) -> tuple[int, int]:
    """A trace size for dynamic height/width with no special cases: every stage has at least two windows
    per side (no size-1 axis the tracer would specialize), padding is non-zero, height != width. ResNet has
    no windows: the same rule with Swin's usual window of 7."""
    window = getattr(cfg.backbone, "window_size", 7)
    h = 32 * (window + 1) + 8
    return h, h + 40


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes that do not concern us (e.g. torchvision ops it could not register)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model_or_folder: Mask2Former | str | Path,
    output: str | Path,
    *,
    height: int | None = None,
    width: int | None = None,
    dynamic_shape: bool = False,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    quantize: str | None = None,
    check: bool = True,
    tolerance: float | None = None,
    check_shapes: Sequence[tuple[int, int, int, int]] | None = None,
    seed: int = 0,
    plugins: bool = False,
    log: Callable[[str], None] | None = print,
) -> ExportReport:
    """Export a model (or an HF checkpoint folder) to ``output`` and check it.

    Shapes: fixed ``height`` x ``width``, or ``dynamic_shape`` (the default when no size is given); a fixed
    ``batch`` or ``dynamic_batch``. ``fp16`` exports a float16 graph (input, outputs and every float
    tensor); it is checked against the float32 PyTorch model at the float16 tolerance. ``quantize="int8"``
    (float32 graphs, for the CPU) quantizes the weights of every MatMul to int8, one scale per output
    channel, stores them as uint8 so that every x86 CPU computes them exactly, and quantizes activations at
    run time (ONNX Runtime's dynamic quantization: ``MatMulInteger``; :mod:`model_export.int8`); it is
    checked at :data:`INT8_TOLERANCE`.

    ``plugins`` writes TensorRT plugin nodes for multi-scale deformable attention and masked attention
    (float32 graphs: TensorRT builds float16 engines from them); the file then needs TensorRT (or the CPU
    reference ops of :mod:`model_export.plugins.ort_reference`) to run.

    The check runs ONNX Runtime and PyTorch on random inputs of ``check_shapes`` (B, 3, H, W) (default:
    the fixed shape; or batch 1 and 3 when the batch is dynamic; two sizes when the shape is dynamic) and
    raises :class:`ExportCheckError` when an output differs by more than ``tolerance`` x max |PyTorch
    output| (default :data:`TOLERANCE`). On failure the file is renamed to ``<output>.failed.onnx``.
    Progress and step timings go to ``log``.
    """
    import onnx

    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither (dynamic shape)")
    if height is not None and dynamic_shape:
        raise ValueError("a fixed height/width and dynamic_shape exclude each other")
    dynamic_shape = height is None
    if height is not None and (height < 32 or width < 32):
        raise ValueError(f"height and width must be at least 32, got {height}x{width}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} not supported: choose {MIN_OPSET}..{MAX_OPSET}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    if quantize and fp16:
        raise ValueError("int8 quantization applies to float32 graphs; leave out fp16")
    if plugins and (fp16 or quantize):
        raise ValueError("plugin graphs are float32 (TensorRT builds float16 engines from them); leave out fp16/int8")
    if plugins and check and importlib.util.find_spec("onnxruntime_extensions") is None:
        raise ValueError(
            "checking a plugin graph runs its plugin nodes through onnxruntime-extensions: pip install "
            "onnxruntime-extensions, or skip the check (--no-check)"
        )
    dtype = "float16" if fp16 else "float32"
    default_tolerance = INT8_TOLERANCE if quantize else TOLERANCE[dtype]
    tolerance = default_tolerance if tolerance is None else tolerance
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    steps = _Steps((6 if check else 5) + bool(quantize), log)

    with steps("load the model"):
        model, source, source_sha, source_files = _load(model_or_folder)
        model = model.eval().cpu()
        cfg = model.config
        export_model = copy.deepcopy(model).half() if fp16 else model
        torch_dtype = torch.float16 if fp16 else torch.float32

    # Trace sizes: batch 2 for a dynamic batch (size 1 would be specialized), a generic size for dynamic H/W.
    trace_b = 2 if dynamic_batch else batch
    trace_h, trace_w = _example_size(cfg) if dynamic_shape else (height, width)
    example = torch.zeros(trace_b, 3, trace_h, trace_w, dtype=torch_dtype)
    axes = {0: torch.export.Dim.DYNAMIC} if dynamic_batch else {}
    if dynamic_shape:
        axes.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    # The CPU flash-attention kernel returns a layout the ONNX converter's attention decomposition does not
    # reproduce (views recorded on one are invalid on the other); tracing with the math kernel keeps both
    # the same. This changes nothing in the graph's arithmetic.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    translations = None
    plugin_context = nullcontext()
    if plugins:  # the model calls the plugin ops while traced; each becomes one plugin node
        from model_export.plugins import ops as plugin_ops

        translations = plugin_ops.translation_table()
        plugin_context = plugin_ops.plugin_ops(export_model)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), _quiet_exporter(), plugin_context:
        with steps(f"trace with torch.export ({'dynamic' if axes else 'static'} shapes)"):
            program = torch.export.export(
                OnnxWrapper(export_model), (example,), dynamic_shapes={"pixel_values": axes or None}, strict=False
            )
        with steps(f"convert to ONNX (opset {opset}) and optimize"):
            onnx_program = torch.onnx.export(
                program,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                optimize=True,  # constant folding, and rewrites that e.g. turn sequence ops into Split
                verbose=False,
                custom_translation_table=translations,
            )
            proto = onnx_program.model_proto
    del program, onnx_program

    with steps("name axes, write metadata, save"):
        _name_dynamic_axes(proto)
        if fp16:
            _compare_in_float16(proto)
        input_shape = _shape(proto.graph.input[0])
        meta = ExportMetadata.from_config(
            cfg,
            input_shape=input_shape,
            dtype=dtype,
            source=source,
            source_sha256=source_sha,
            source_files=source_files,
            opset=opset,
            exporter={
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "exporter": "torch.export + torch.onnx",
                **({"plugins": ", ".join(_plugin_ops())} if plugins else {}),
            },
            quantization="int8-dynamic" if quantize else "",
            quantization_info=dict(int8.INFO) if quantize else {},
        )
        write_metadata(proto, meta)
        _save(proto, output)
    if quantize:
        with steps("quantize MatMul weights to int8 (per channel; activations at run time)"):
            proto = int8.quantize_dynamic_int8(output)
            write_metadata(proto, meta)
            _save(proto, output)

    with steps("onnx.checker, dtype and op scan"):
        onnx.checker.check_model(str(output), full_check=True)
        saved = onnx.load(str(output))
        foreign = {k: v for k, v in float_tensor_types(saved).items() if v != dtype}
        if foreign:
            sample = ", ".join(f"{k}: {v}" for k, v in list(foreign.items())[:8])
            failed = _set_aside(output)
            raise ExportCheckError(f"{len(foreign)} float tensors are not {dtype} ({sample}); graph moved to {failed}")
        ops = op_types(saved)
        custom = [op for op in ops if "::" in op and op not in (_plugin_ops() if plugins else ())]
        if custom:
            failed = _set_aside(output)
            raise ExportCheckError(f"ops outside the standard ONNX domain: {custom}; graph moved to {failed}")
        if plugins:  # one deformable-attention node per encoder layer, one masked-attention node per decoder layer
            want = dict(zip(_plugin_ops(), (cfg.encoder_layers, cfg.decoder_layers)))
            got = {op: ops.get(op, 0) for op in want}
            if got != want:
                failed = _set_aside(output)
                raise ExportCheckError(f"plugin nodes {got}, expected {want}; graph moved to {failed}")

    report = ExportReport(
        path=output,
        size_bytes=_file_size(output),
        opset=opset,
        dtype=dtype,
        input_shape=input_shape,
        output_shapes={o.name: _shape(o) for o in saved.graph.output},
        op_types=ops,
        tolerance=tolerance,
        metadata=meta,
        timings=steps.timings,
    )
    if not check:
        return report

    if check_shapes is None:
        batches = (1, 3) if dynamic_batch else (batch,)
        sizes = DEFAULT_CHECK_SIZES if dynamic_shape else ((height, width),)
        n = max(len(batches), len(sizes))
        check_shapes = [(batches[i % len(batches)], 3, *sizes[i % len(sizes)]) for i in range(n)]
    with steps(f"check in ONNX Runtime against PyTorch on {len(check_shapes)} input(s)"):
        report.checks = check_against_pytorch(saved, model, check_shapes, tolerance, dtype, seed)
        del saved
    for c in report.checks:
        if log:
            log(f"      {c.describe()}")
    report.timings = steps.timings
    if not report.passed:
        report.path = failed = _set_aside(output)
        raise ExportCheckError(
            f"ONNX Runtime output differs from PyTorch beyond the tolerance {tolerance:g}; the graph was moved to "
            f"{failed}.\n{report.summary()}",
            report,
        )
    # Record the check's figures in the file itself (metadata only; the graph is the one checked).
    meta = replace(
        meta,
        check={
            "tolerance": tolerance,
            "max_rel_diff": report.max_rel_diff,
            "inputs": [list(c.input_shape) for c in report.checks],
            "onnxruntime": _ort_version(),
        },
    )
    write_metadata(proto, meta)
    _save(proto, output)
    report.metadata = meta
    report.size_bytes = _file_size(output)
    return report


def _set_aside(path: Path) -> Path:
    """Rename a graph that failed its check to ``<name>.failed.onnx`` so that nobody serves it by mistake."""
    failed = path.with_name(path.name + ".failed.onnx")
    os.replace(path, failed)
    return failed


def _save(proto: Any, path: Path) -> None:
    import onnx

    if proto.ByteSize() > LARGE_MODEL_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))


def _file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _plugin_ops() -> tuple[str, ...]:
    from model_export.plugins import PLUGIN_OPS

    return PLUGIN_OPS


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# ---------------------------------------------------------------------------------------------- check
def _probes(model: Any, layers: int) -> tuple[list[str], list[str]] | None:
    """Names of the intermediate tensors the check reads: the mask logits each decoder layer attended with
    (at its level) then the ``mask_logits`` output, and the boolean attention mask each layer used; or None if
    they cannot be identified.

    The mask products are the graph's only ``Einsum`` nodes, in order: "bqc,bcs->bqs" once per layer on the
    mask features resized to its level, then "bqc,bchw->bqhw" for the ``mask_logits`` output (see
    :meth:`mask2former.transformer_decoder.TransformerDecoder.forward`); each layer's attention mask is the
    graph's only ``Or``
    (``attend | ~anywhere`` in :func:`mask2former.transformer_decoder.attention_mask`). In a plugin graph the
    masked-attention nodes derive the mask themselves: there the names are those of their mask-logits inputs
    (B, Q, S) instead, from which the caller derives the mask the plugin used.
    """
    from model_export.plugins import MASKED_ATTENTION_DOMAIN, MASKED_ATTENTION_OP

    steps = [n.output[0] for n in model.graph.node if n.op_type == "Einsum"]
    masks = [n.output[0] for n in model.graph.node if n.op_type == "Or"]
    if not masks:
        masks = [
            n.input[3]
            for n in model.graph.node
            if n.op_type == MASKED_ATTENTION_OP and n.domain == MASKED_ATTENTION_DOMAIN
        ]
    if len(steps) != layers + 1 or steps[-1] != OUTPUT_NAMES[1] or len(masks) != layers:
        return None
    return steps, masks


def check_against_pytorch(
    onnx_model: Any,
    model: Mask2Former,
    inputs: Sequence[tuple[int, int, int, int] | np.ndarray],
    tolerance: float = TOLERANCE["float32"],
    dtype: str = "float32",
    seed: int = 0,
) -> list[CheckResult]:
    """Run the ONNX model (a ``ModelProto`` or a path) in ONNX Runtime and the float32 PyTorch model on each
    input (an array, or a (B, 3, H, W) shape for a standard-normal one drawn with ``seed``); compare the
    outputs and every layer's attention mask (see the module docstring). A plugin graph runs with the plugin
    nodes' CPU reference implementations."""
    import onnx

    from model_export.plugins.ort_reference import is_plugin_graph, reference_session
    from service.onnx_runtime import available_cpus, open_session, session_options

    if isinstance(onnx_model, str | Path):
        onnx_model = onnx.load(str(onnx_model))
    plugin_graph = is_plugin_graph(onnx_model)
    layers = model.config.decoder_layers
    # Expose the intermediate mask logits and attention masks as extra outputs of a copy of the graph (not
    # possible past protobuf's 2 GB; then only the outputs are compared).
    small = onnx_model.ByteSize() < LARGE_MODEL_BYTES
    probes = _probes(onnx_model, layers) if small else None
    extra: list[str] = []
    if probes:
        probe = onnx.ModelProto()
        probe.CopyFrom(onnx_model)
        step_names, mask_names = probes
        for name in step_names[:-1]:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, _DTYPE_CODE[dtype], None))
        mask_type = _DTYPE_CODE[dtype] if plugin_graph else onnx.TensorProto.BOOL  # plugin graphs: mask logits
        for name in mask_names:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, mask_type, None))
        extra = [*step_names[:-1], *mask_names]
        source = probe.SerializeToString()
        del probe
    elif small:
        source = onnx_model.SerializeToString()
    else:
        raise ValueError("pass the path of a model larger than 2 GB, not its proto")
    opts = session_options(available_cpus())  # run it as the service's runner does
    if plugin_graph:
        session = reference_session(source, opts)
    else:
        session = open_session(source, opts, ["CPUExecutionProvider"])
    del source
    np_dtype = np.float16 if dtype == "float16" else np.float32

    results = []
    gen = torch.Generator().manual_seed(seed)
    for item in inputs:
        x = torch.from_numpy(np.asarray(item, dtype=np.float32)) if isinstance(item, np.ndarray) else None
        x = torch.randn(*item, generator=gen) if x is None else x
        shape = tuple(x.shape)
        t0 = time.perf_counter()
        got = session.run([*OUTPUT_NAMES, *extra], {INPUT_NAME: x.numpy().astype(np_dtype)})
        t1 = time.perf_counter()
        with torch.inference_mode():
            ref = model(x, aux=True)
        t2 = time.perf_counter()
        got = [torch.from_numpy(g if g.dtype == np.bool_ else g.astype(np.float32)) for g in got]
        ref_steps = [*ref.attention_logits, ref.mask_logits]  # per layer (B, Q, S_l), then (B, Q, H/4, W/4)
        result = CheckResult(shape, {}, {}, tolerance, seconds_onnxruntime=t1 - t0, seconds_pytorch=t2 - t1)
        if probes:
            ort_steps = [*got[2 : 2 + layers], got[1]]
            if plugin_graph:  # the mask each masked-attention node derived from its logits (B, Q, S)
                from model_export.plugins.ops import level_attention_mask

                ort_masks = [level_attention_mask(m) for m in got[2 + layers :]]
            else:
                ort_masks = [m.reshape(shape[0], 1, m.shape[-2], m.shape[-1]) for m in got[2 + layers :]]
            _find_flips(result, ort_masks, ref_steps[:-1], tolerance)
        if result.first_flip_layer is None:
            pairs = {"class_logits": (got[0], ref.class_logits), "mask_logits": (got[1], ref.mask_logits)}
        else:  # the mask logits of every layer up to the first flip must still agree
            result.layers_compared = result.first_flip_layer + 1
            pairs = {f"mask logits of layer {i}": (ort_steps[i], ref_steps[i]) for i in range(result.layers_compared)}
        for name, (a, b) in pairs.items():
            if a.shape != b.shape:
                raise ExportCheckError(f"{name}: ONNX Runtime shape {tuple(a.shape)} != PyTorch {tuple(b.shape)}")
            result.max_abs_diff[name] = (a - b).abs().max().item()
            result.max_abs_ref[name] = b.abs().max().item()
        results.append(result)
    return results


def _find_flips(
    result: CheckResult,
    ort_masks: list[torch.Tensor],
    ref_logits: list[torch.Tensor],
    tolerance: float,
) -> None:
    """Compare the attention mask each decoder layer used in ONNX Runtime (bool (B, 1, Q, S)) with the one
    PyTorch derives from the mask logits that layer attended with (``ref_logits``, (B, Q, S) at its level);
    record flips and whether each sits at a logit within ``tolerance`` x max |logit| of 0."""
    for i, (got, logits) in enumerate(zip(ort_masks, ref_logits, strict=True)):  # layer i
        want = attention_mask_at_level(logits)
        if got.shape != want.shape:
            raise ExportCheckError(f"layer {i} attention mask: shape {tuple(got.shape)} != {tuple(want.shape)}")
        differ = got != want
        if not differ.any():
            continue
        logits = logits.unsqueeze(1)  # (B, 1, Q, S)
        near = logits.abs() <= tolerance * logits.abs().max()
        # A bit flips because its own logit is near 0, or because its whole row opened or closed: a query
        # blocked everywhere attends everywhere. PyTorch's row was blocked everywhere and one of its logits
        # is near 0, or ONNX Runtime's row is fully open and every logit PyTorch has open is near 0.
        opened = logits.sigmoid() >= 0.5
        ref_row = ~opened.any(-1, keepdim=True) & near.any(-1, keepdim=True)
        ort_row = got.all(-1, keepdim=True) & (~opened | near).all(-1, keepdim=True)
        explained = near | ref_row | ort_row
        result.flips_near_zero &= bool(explained[differ].all())
        result.mask_flips += int(differ.sum())
        if result.first_flip_layer is None:
            result.first_flip_layer = i
