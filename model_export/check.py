"""The export check: the written graph in ONNX Runtime against the PyTorch model, within a stated tolerance.

:func:`check_against_pytorch` runs both on test inputs and compares the outputs (:class:`CheckResult`); its
ONNX Runtime half, :func:`run_probed`, can also run apart (in another process, under a CPU emulator);
:class:`ExportReport` gathers what the exporter (:mod:`model_export.onnx`) did and found, and
:class:`ExportCheckError` is what it raises when the graph fails. ONNX Runtime sessions are opened with the
runner's own settings (:mod:`runtimes.ort_session`).

Masked attention thresholds each layer's mask logits at 0, so a logit within rounding of 0 can fall on
either side in two correct implementations and change what that query attends to; after such a flip the
two outputs legitimately differ. The check therefore also reads, out of ONNX Runtime, the boolean
attention mask each decoder layer actually used and the mask logits (at the layer's level) it came from,
and compares both with PyTorch's: outputs are compared in full only when no mask bit flipped; a flip is
reported, accepted only where the logit is within the tolerance of 0 (:func:`_find_flips`), and then the
mask logits up to the flip are compared instead. Nothing is loosened to absorb it.

A plugin graph (``--plugins``) runs with the plugin nodes implemented on the CPU by our reference code
(:mod:`model_export.plugins.ort_reference`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from mask2former.attention_mask import attention_mask_at_level
from mask2former.mask2former import Mask2Former
from model_export.graph import LARGE_MODEL_BYTES
from model_export.plugins import MASKED_ATTENTION_DOMAIN, MASKED_ATTENTION_OP
from model_export.plugins.ort_reference import is_plugin_graph, reference_session
from model_format.metadata import INPUT_NAME, OUTPUT_NAMES, ExportMetadata
from runtimes.runner import available_cpus

# Max |ONNX Runtime - PyTorch| allowed, relative to max |PyTorch| of each output.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
# With int8 weights the outputs move by a few percent of their range (mask-logit signs near 0 flip and then
# whole queries attend elsewhere), so the check is a sanity bound that catches a broken graph; the accuracy
# that matters is measured as ΔPQ on the demo set (tests/test_demo_model.py, bench/onnxruntime_vs_eager.py).
INT8_TOLERANCE = 0.1
DTYPE_CODE = {"float32": 1, "float16": 10}  # onnx.TensorProto values


class ExportCheckError(RuntimeError):
    """The exported graph failed its check (ONNX checker, dtype scan, or ONNX Runtime vs PyTorch)."""

    def __init__(self, message: str, report: ExportReport | None = None):
        super().__init__(message)
        self.report = report


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


def ort_version() -> str:
    """The ONNX Runtime version the check ran with (recorded in the file's metadata)."""
    import onnxruntime  # lazy: onnxruntime (an export with check=False runs without it)

    return onnxruntime.__version__


def _probes(model: Any, layers: int) -> tuple[list[str], list[str]] | None:
    """Names of the intermediate tensors the check reads: the mask logits each decoder layer attended with
    (at its level) then the ``mask_logits`` output, and the boolean attention mask each layer used; or None if
    they cannot be identified.

    The mask products are the graph's only ``Einsum`` nodes, in order: "bqc,bcs->bqs" once per layer on the
    mask features resized to its level, then "bqc,bchw->bqhw" for the ``mask_logits`` output (see
    :meth:`mask2former.transformer_decoder.TransformerDecoder.forward`); each layer's attention mask is the
    graph's only ``Or``
    (``attend | ~anywhere`` in :func:`mask2former.attention_mask.attention_mask`). In a plugin graph the
    masked-attention nodes derive the mask themselves: there the names are those of their mask-logits inputs
    (B, Q, S) instead, from which the caller derives the mask the plugin used.
    """
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


@dataclass
class ProbedOutputs:
    """What the runtime under check computed for one input (ONNX Runtime, or OpenVINO, by :func:`run_probed`; or
    any other path that gives the same arrays): the outputs, and (when the graph's probes were found) each decoder
    layer's mask logits and attention mask."""

    arrays: list[np.ndarray]  # class_logits, mask_logits, then the probes (layers' mask logits, then masks)
    probed: bool  # the probes were found: arrays holds them after the two outputs
    plugin_graph: bool  # the masks are a plugin graph's mask-logits inputs, not boolean masks
    seconds: float = 0.0


def run_probed(
    onnx_model: Any,
    layers: int,
    arrays: Sequence[np.ndarray],
    dtype: str = "float32",
    openvino: str | None = None,
) -> list[ProbedOutputs]:
    """Run the ONNX model (a ``ModelProto`` or a path) in ONNX Runtime, with the runner's session settings, on
    each (B, 3, H, W) array, reading also the intermediate tensors :func:`_probes` names. This is the half of
    the check that involves only ONNX Runtime: it can run in another process or under a CPU emulator, and
    :func:`check_against_pytorch` then compares its results (``onnx_outputs``) with PyTorch's. With
    ``openvino`` ("f32" or "bf16") the graph runs in OpenVINO at that inference precision instead, compiled as
    its runner compiles it, so that the same check judges that runner."""
    from runtimes.ort_session import (  # lazy: onnxruntime (an export with check=False runs without it)
        open_session,
        session_options,
    )

    if isinstance(onnx_model, str | Path):
        onnx_model = onnx.load(str(onnx_model))
    plugin_graph = is_plugin_graph(onnx_model)
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
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, DTYPE_CODE[dtype], None))
        mask_type = DTYPE_CODE[dtype] if plugin_graph else onnx.TensorProto.BOOL  # plugin graphs: mask logits
        for name in mask_names:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, mask_type, None))
        extra = [*step_names[:-1], *mask_names]
        source = probe.SerializeToString()
        del probe
    elif small:
        source = onnx_model.SerializeToString()
    else:
        raise ValueError("pass the path of a model larger than 2 GB, not its proto")
    names = [*OUTPUT_NAMES, *extra]
    if openvino is not None:
        if plugin_graph:
            raise ValueError("OpenVINO cannot run the plugin nodes of a --plugins graph")
        run = _openvino_run(source, names, openvino)
    else:
        opts = session_options(available_cpus())  # run it as the service's runner does
        if plugin_graph:
            session = reference_session(source, opts)
        else:
            session = open_session(source, opts, ["CPUExecutionProvider"])

        def run(x: np.ndarray) -> list[np.ndarray]:
            return session.run(names, {INPUT_NAME: x})

    del source
    np_dtype = np.float16 if dtype == "float16" else np.float32
    results = []
    for x in arrays:
        t0 = time.perf_counter()
        got = run(np.asarray(x).astype(np_dtype))
        results.append(ProbedOutputs(got, bool(probes), plugin_graph, time.perf_counter() - t0))
    return results


def _openvino_run(source: bytes, names: list[str], precision: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    """The probe graph compiled by OpenVINO as :class:`runtimes.openvino_runner.OpenVinoRunner` compiles a model
    at ``precision`` ("f32" or "bf16"): a function of the input returning the ``names`` outputs, in order."""
    from runtimes.openvino_runner import compile_onnx  # lazy: openvino (an optional extra)

    compiled = compile_onnx(source, precision, available_cpus())
    request = compiled.create_infer_request()
    outputs = {name: out for out in compiled.outputs for name in out.get_names()}

    def run(x: np.ndarray) -> list[np.ndarray]:
        results = request.infer({0: x})
        return [np.array(results[outputs[name]]) for name in names]

    return run


def check_against_pytorch(
    onnx_model: Any,
    model: Mask2Former,
    inputs: Sequence[tuple[int, int, int, int] | np.ndarray],
    tolerance: float = TOLERANCE["float32"],
    dtype: str = "float32",
    seed: int = 0,
    onnx_outputs: Sequence[ProbedOutputs] | None = None,
) -> list[CheckResult]:
    """Run the ONNX model (a ``ModelProto`` or a path) in ONNX Runtime and the float32 PyTorch model on each
    input (an array, or a (B, 3, H, W) shape for a standard-normal one drawn with ``seed``); compare the
    outputs and every layer's attention mask (see the module docstring). A plugin graph runs with the plugin
    nodes' CPU reference implementations. ``onnx_outputs``, one per input, are results computed elsewhere (by
    :func:`run_probed` in another process, under an emulator, or in OpenVINO); ``onnx_model`` is then not run."""
    layers = model.config.decoder_layers
    gen = torch.Generator().manual_seed(seed)
    xs = [
        torch.from_numpy(np.asarray(item, dtype=np.float32))
        if isinstance(item, np.ndarray)
        else torch.randn(*item, generator=gen)
        for item in inputs
    ]
    if onnx_outputs is None:
        onnx_outputs = run_probed(onnx_model, layers, [x.numpy() for x in xs], dtype)
    if len(onnx_outputs) != len(xs):
        raise ValueError(f"{len(onnx_outputs)} ONNX Runtime results for {len(xs)} inputs")
    results = []
    for x, out in zip(xs, onnx_outputs, strict=True):
        shape = tuple(x.shape)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref = model(x, aux=True)
        t1 = time.perf_counter()
        got = [torch.from_numpy(g if g.dtype == np.bool_ else g.astype(np.float32)) for g in out.arrays]
        ref_steps = [*ref.attention_logits, ref.mask_logits]  # per layer (B, Q, S_l), then (B, Q, H/4, W/4)
        result = CheckResult(shape, {}, {}, tolerance, seconds_onnxruntime=out.seconds, seconds_pytorch=t1 - t0)
        if out.probed:
            ort_steps = [*got[2 : 2 + layers], got[1]]
            if out.plugin_graph:  # the mask each masked-attention node derived from its logits (B, Q, S)
                from model_export.plugins.ops import level_attention_mask  # lazy: triton (plugin graphs only)

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
