"""Mask2Former -> ONNX, checked against PyTorch before it is handed over.

:func:`export_onnx` traces the model with ``torch.export`` (the exporter behind
``torch.onnx.export(..., dynamo=True)``), converts it to ONNX with standard ops only (masked attention is
MatMul/Softmax with an additive mask, MSDeformAttn is ``GridSample``), writes the runtime metadata (see
:mod:`model_format.metadata`), then checks the written file: ``onnx.checker``, a scan that every float
tensor has the export dtype (no float64 anywhere; :mod:`model_export.graph`), and a run in ONNX Runtime
compared with PyTorch on test inputs (:mod:`model_export.check`). The check fails the export when the
difference is over the tolerance.

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
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mask2former.mask2former import Mask2Former
from mask2former.weights import load_model
from model_export import int8
from model_export.check import (
    INT8_TOLERANCE,
    TOLERANCE,
    ExportCheckError,
    ExportReport,
    check_against_pytorch,
    ort_version,
)
from model_export.graph import (
    compare_in_float16,
    file_size,
    float_tensor_types,
    name_dynamic_axes,
    op_types,
    save,
    set_aside,
    value_shape,
)
from model_export.plugins import PLUGIN_OPS
from model_format.metadata import INPUT_NAME, OUTPUT_NAMES, ExportMetadata, checkpoint_sha256, write_metadata
from pipeline.config import Mask2FormerConfig

DEFAULT_OPSET = 20  # torch 2.13's default; GridSample needs >= 16, the torch.export-based exporter >= 18
MIN_OPSET, MAX_OPSET = 18, 23
QUANTIZATIONS = ("int8",)
# Sizes the dynamic-shape check runs at when none are given: one a multiple of 32, one not.
DEFAULT_CHECK_SIZES = ((128, 192), (200, 136))


class OnnxWrapper(nn.Module):
    """The exported module: ``pixel_values`` (B, 3, H, W) -> ``class_logits`` (B, Q, K+1), ``mask_logits``
    (B, Q, ceil(H/4), ceil(W/4)). Fixed names, no auxiliary outputs, no post-processing in the graph."""

    def __init__(self, model: Mask2Former):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values)
        return out.class_logits, out.mask_logits


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


def module_sha256(model: Mask2Former) -> str:
    """Hash of an in-memory model: its config and every tensor of its state dict."""
    h = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load(model_or_folder: Mask2Former | str | Path) -> tuple[Mask2Former, str, str, dict[str, str]]:
    if isinstance(model_or_folder, nn.Module):
        return model_or_folder, "<in-memory module>", module_sha256(model_or_folder), {}
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


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_onnx` writes and how it checks it; refused (ValueError) when the options contradict.

    Shapes: fixed ``height`` x ``width``, or ``dynamic_shape`` (the default when no size is given); a fixed
    ``batch`` or ``dynamic_batch``. ``fp16`` exports a float16 graph (input, outputs and every float tensor),
    checked against the float32 PyTorch model at the float16 tolerance. ``quantize="int8"`` (float32 graphs, for
    the CPU) quantizes the weights of the backbone's and the decoder layers' MatMuls to int8, one scale per output
    channel, stores them as uint8 so that every x86 CPU computes them exactly, and quantizes activations at run
    time (ONNX Runtime's dynamic quantization: ``MatMulInteger``; :mod:`model_format.int8`); the pixel decoder,
    mask head and class head, which make the attention masks and the outputs, stay float32
    (:data:`model_export.int8.FLOAT_MODULES`); it is checked at
    :data:`~model_export.check.INT8_TOLERANCE`. ``plugins`` writes TensorRT plugin nodes for multi-scale
    deformable attention and masked attention (float32 graphs: TensorRT builds float16 engines from them); the
    file then needs TensorRT (or the CPU reference ops of :mod:`model_export.plugins.ort_reference`) to run.

    ``check`` runs ONNX Runtime and PyTorch on random inputs (``seed``) of ``check_shapes`` (B, 3, H, W)
    (default: the fixed shape; or batch 1 and 3 when the batch is dynamic; two sizes when the shape is
    dynamic) and fails when an output differs by more than ``tolerance`` x max |PyTorch output| (default
    :data:`~model_export.check.TOLERANCE` for the dtype).
    """

    height: int | None = None
    width: int | None = None
    dynamic_shape: bool = False
    batch: int = 1
    dynamic_batch: bool = False
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    quantize: str | None = None
    plugins: bool = False
    check: bool = True
    tolerance: float | None = None
    check_shapes: Sequence[tuple[int, int, int, int]] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        height, width = self.height, self.width
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or neither (dynamic shape)")
        if height is not None and self.dynamic_shape:
            raise ValueError("a fixed height/width and dynamic_shape exclude each other")
        if height is not None and (height < 32 or width < 32):
            raise ValueError(f"height and width must be at least 32, got {height}x{width}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"opset {self.opset} not supported: choose {MIN_OPSET}..{MAX_OPSET}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {self.quantize!r}")
        if self.quantize and self.fp16:
            raise ValueError("int8 quantization applies to float32 graphs; leave out fp16")
        if self.plugins and (self.fp16 or self.quantize):
            raise ValueError(
                "plugin graphs are float32 (TensorRT builds float16 engines from them); leave out fp16/int8"
            )
        if self.plugins and self.check and importlib.util.find_spec("onnxruntime_extensions") is None:
            raise ValueError(
                "checking a plugin graph runs its plugin nodes through onnxruntime-extensions: pip install "
                "onnxruntime-extensions, or skip the check (--no-check)"
            )

    @property
    def dynamic_size(self) -> bool:
        return self.height is None

    @property
    def dtype(self) -> str:
        return "float16" if self.fp16 else "float32"

    @property
    def check_tolerance(self) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return INT8_TOLERANCE if self.quantize else TOLERANCE[self.dtype]

    def inputs_to_check(self) -> list[tuple[int, int, int, int]]:
        if self.check_shapes is not None:
            return list(self.check_shapes)
        batches = (1, 3) if self.dynamic_batch else (self.batch,)
        sizes = DEFAULT_CHECK_SIZES if self.dynamic_size else ((self.height, self.width),)
        n = max(len(batches), len(sizes))
        return [(batches[i % len(batches)], 3, *sizes[i % len(sizes)]) for i in range(n)]


def export_onnx(
    model_or_folder: Mask2Former | str | Path,
    output: str | Path,
    *,
    log: Callable[[str], None] | None = print,
    **options: Any,
) -> ExportReport:
    """Export a model (or a checkpoint folder) to ``output`` with :class:`ExportOptions` ``options``, and check it.

    The steps: load, trace and convert (:func:`_convert`), name the axes and write the metadata, quantize
    (int8), scan the written file (:func:`_scan`: ``onnx.checker``, dtypes, ops), and compare ONNX Runtime with
    PyTorch (:func:`_check`). On a failed scan or check, :class:`ExportCheckError` is raised and the file is
    renamed to ``<output>.failed.onnx``. Progress and step timings go to ``log``.
    """
    opts = ExportOptions(**options)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    steps = _Steps((6 if opts.check else 5) + bool(opts.quantize), log)

    with steps("load the model"):
        model, source, source_sha, source_files = _load(model_or_folder)
        model = model.eval().cpu()
    proto = _convert(model, opts, steps)
    with steps("name axes, write metadata, save"):
        name_dynamic_axes(proto)
        if opts.fp16:
            compare_in_float16(proto)
        input_shape = value_shape(proto.graph.input[0])
        meta = ExportMetadata.from_config(
            model.config,
            input_shape=input_shape,
            dtype=opts.dtype,
            source=source,
            source_sha256=source_sha,
            source_files=source_files,
            opset=opts.opset,
            exporter={
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "exporter": "torch.export + torch.onnx",
                **({"plugins": ", ".join(PLUGIN_OPS)} if opts.plugins else {}),
            },
        )
        write_metadata(proto, meta)
        save(proto, output)
    if opts.quantize:
        with steps("quantize MatMul weights to int8 (per channel; activations at run time)"):
            proto, meta = int8.quantize_export(output, meta)  # the metadata in hand: not read back from the file
    with steps("onnx.checker, dtype and op scan"):
        saved, ops = _scan(output, opts, model.config)

    report = ExportReport(
        path=output,
        size_bytes=file_size(output),
        opset=opts.opset,
        dtype=opts.dtype,
        input_shape=input_shape,
        output_shapes={o.name: value_shape(o) for o in saved.graph.output},
        op_types=ops,
        tolerance=opts.check_tolerance,
        metadata=meta,
        timings=steps.timings,
    )
    if opts.check:
        _check(report, proto, saved, model, opts, steps, log)
    return report


def _convert(model: Mask2Former, opts: ExportOptions, steps: _Steps) -> Any:
    """Trace ``model`` with ``torch.export`` and convert it: the ``onnx.ModelProto``, not yet saved."""
    export_model = copy.deepcopy(model).half() if opts.fp16 else model
    # Trace sizes: batch 2 for a dynamic batch (size 1 would be specialized), a generic size for dynamic H/W.
    trace_b = 2 if opts.dynamic_batch else opts.batch
    trace_h, trace_w = _example_size(model.config) if opts.dynamic_size else (opts.height, opts.width)
    example = torch.zeros(trace_b, 3, trace_h, trace_w, dtype=torch.float16 if opts.fp16 else torch.float32)
    axes = {0: torch.export.Dim.DYNAMIC} if opts.dynamic_batch else {}
    if opts.dynamic_size:
        axes.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    translations = None
    plugin_context = nullcontext()
    if opts.plugins:  # the model calls the plugin ops while traced; each becomes one plugin node
        from model_export.plugins import ops as plugin_ops  # lazy: triton, onnxscript (plugin exports only)

        translations = plugin_ops.translation_table()
        plugin_context = plugin_ops.plugin_ops(export_model)
    # The CPU flash-attention kernel returns a layout the ONNX converter's attention decomposition does not
    # reproduce (views recorded on one are invalid on the other); tracing with the math kernel keeps both
    # the same. This changes nothing in the graph's arithmetic.
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), _quiet_exporter(), plugin_context:
        with steps(f"trace with torch.export ({'dynamic' if axes else 'static'} shapes)"):
            program = torch.export.export(
                OnnxWrapper(export_model), (example,), dynamic_shapes={"pixel_values": axes or None}, strict=False
            )
        with steps(f"convert to ONNX (opset {opts.opset}) and optimize"):
            onnx_program = torch.onnx.export(
                program,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opts.opset,
                optimize=True,  # constant folding, and rewrites that e.g. turn sequence ops into Split
                verbose=False,
                custom_translation_table=translations,
            )
    return onnx_program.model_proto


def _scan(output: Path, opts: ExportOptions, cfg: Mask2FormerConfig) -> tuple[Any, dict[str, int]]:
    """``onnx.checker`` on the written file, then: every float tensor has the export dtype, every op is standard
    (or one of the plugin nodes, one per encoder / decoder layer). Returns the loaded graph and its op counts;
    on a failure the file is set aside and :class:`ExportCheckError` raised."""
    onnx.checker.check_model(str(output), full_check=True)
    saved = onnx.load(str(output))
    foreign = {k: v for k, v in float_tensor_types(saved).items() if v != opts.dtype}
    if foreign:
        sample = ", ".join(f"{k}: {v}" for k, v in list(foreign.items())[:8])
        failed = set_aside(output)
        raise ExportCheckError(f"{len(foreign)} float tensors are not {opts.dtype} ({sample}); graph moved to {failed}")
    ops = op_types(saved)
    custom = [op for op in ops if "::" in op and op not in (PLUGIN_OPS if opts.plugins else ())]
    if custom:
        failed = set_aside(output)
        raise ExportCheckError(f"ops outside the standard ONNX domain: {custom}; graph moved to {failed}")
    if opts.plugins:
        want = dict(zip(PLUGIN_OPS, (cfg.encoder_layers, cfg.decoder_layers)))
        got = {op: ops.get(op, 0) for op in want}
        if got != want:
            failed = set_aside(output)
            raise ExportCheckError(f"plugin nodes {got}, expected {want}; graph moved to {failed}")
    return saved, ops


def _check(
    report: ExportReport,
    proto: Any,
    saved: Any,
    model: Mask2Former,
    opts: ExportOptions,
    steps: _Steps,
    log: Callable[[str], None] | None,
) -> None:
    """Compare ONNX Runtime with PyTorch on :meth:`ExportOptions.inputs_to_check`; fills ``report`` and records
    the figures in the file's metadata, or sets the file aside and raises :class:`ExportCheckError`."""
    shapes = opts.inputs_to_check()
    with steps(f"check in ONNX Runtime against PyTorch on {len(shapes)} input(s)"):
        report.checks = check_against_pytorch(saved, model, shapes, opts.check_tolerance, opts.dtype, opts.seed)
    for c in report.checks:
        if log:
            log(f"      {c.describe()}")
    report.timings = steps.timings
    if not report.passed:
        report.path = failed = set_aside(report.path)
        raise ExportCheckError(
            f"ONNX Runtime output differs from PyTorch beyond the tolerance {opts.check_tolerance:g}; the graph was "
            f"moved to {failed}.\n{report.summary()}",
            report,
        )
    # Record the check's figures in the file itself (metadata only; the graph is the one checked).
    report.metadata = replace(
        report.metadata,
        check={
            "tolerance": opts.check_tolerance,
            "max_rel_diff": report.max_rel_diff,
            "inputs": [list(c.input_shape) for c in report.checks],
            "onnxruntime": ort_version(),
        },
    )
    write_metadata(proto, report.metadata)
    save(proto, report.path)
    report.size_bytes = file_size(report.path)
