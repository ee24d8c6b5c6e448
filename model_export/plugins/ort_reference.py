"""The plugin nodes on the CPU in ONNX Runtime, for checking a plugin graph without TensorRT.

ONNX Runtime runs a graph's custom nodes through ``onnxruntime-extensions`` Python ops: each plugin op is
registered with ``@onnx_op`` and calls the same CPU implementation as the PyTorch custom op
(:mod:`model_export.plugins.ops`: the model's own deformable-attention code, and masked attention with the
kernel's ``logit >= 0`` rule). Everything else in the graph runs in ONNX Runtime as usual.

onnxruntime-extensions registers Python ops in its one domain, ``ai.onnx.contrib``, whatever the node says
(``@onnx_op`` takes no domain). :func:`contrib_copy` therefore rewrites the domains of the plugin nodes in a
*copy* of the graph (``trt.plugins``/``m2f`` -> ``ai.onnx.contrib``, with the opset imports to match); op
types, inputs and attributes stay as exported. The file written for TensorRT is never touched.

The ops also count what they saw (:data:`STATS`): calls per op, and the mask-logit entries where the
plugin's rule (``logit >= 0``) and the model's (``sigmoid(logit) >= 0.5``) disagree, so that a parity check
can tell a legitimate attention-mask flip from a broken graph.

Verification only: needs torch and onnxruntime-extensions (a development dependency).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from model_export.plugins import (
    MASKED_ATTENTION_DOMAIN,
    MASKED_ATTENTION_OP,
    MS_DEFORM_ATTN_DOMAIN,
    MS_DEFORM_ATTN_OP,
    PLUGIN_DOMAINS,
)

CONTRIB_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions' Python ops are registered in
_PLUGIN_NODES = {(MS_DEFORM_ATTN_DOMAIN, MS_DEFORM_ATTN_OP), (MASKED_ATTENTION_DOMAIN, MASKED_ATTENTION_OP)}


@dataclass
class ReferenceStats:
    """What the reference ops did since the last :meth:`reset`."""

    calls: Counter[str] = field(default_factory=Counter)  # op type -> calls
    rule_disagreements: int = 0  # mask-logit entries where logit >= 0 and sigmoid(logit) >= 0.5 differ
    min_abs_logit: float = float("inf")  # the smallest |mask logit| a masked-attention node was given

    def reset(self) -> None:
        self.calls.clear()
        self.rule_disagreements = 0
        self.min_abs_logit = float("inf")


STATS = ReferenceStats()
_registered = False


def register() -> None:
    """Register the two reference ops with onnxruntime-extensions (once per process)."""
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op  # lazy: onnxruntime-extensions (plugin graphs only)

    from model_export.plugins.ops import (  # lazy: triton, onnxscript (ops imports them; plugin graphs only)
        masked_attention_logit_rule,
        ms_deform_attn_op,
    )

    f32, i32, string = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_string
    plugin_attrs = {"plugin_version": string, "plugin_namespace": string}

    @onnx_op(op_type=MS_DEFORM_ATTN_OP, inputs=[f32, i32, i32, f32, f32], outputs=[f32], attrs=plugin_attrs)
    def _ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **_):
        STATS.calls[MS_DEFORM_ATTN_OP] += 1
        with torch.inference_mode():
            out = ms_deform_attn_op(
                *map(_tensor, (value, spatial_shapes, level_start_index, sampling_locations, attention_weights))
            )  # (N, Lq, M, D)
        return out.numpy()

    @onnx_op(
        op_type=MASKED_ATTENTION_OP,
        inputs=[f32, f32, f32, f32],
        outputs=[f32],
        attrs={"scale": PyCustomOpDef.dt_float, **plugin_attrs},
    )
    def _masked_attention(q, k, v, mask_logits, scale: float, **_):
        STATS.calls[MASKED_ATTENTION_OP] += 1
        logits = _tensor(mask_logits)  # (B, Q, S)
        with torch.inference_mode():
            half = torch.full((), 0.5, dtype=logits.dtype)
            STATS.rule_disagreements += int(((logits >= 0) != (logits.sigmoid() >= half)).sum())
            STATS.min_abs_logit = min(STATS.min_abs_logit, float(logits.abs().min()))
            out = masked_attention_logit_rule(_tensor(q), _tensor(k), _tensor(v), logits, scale)  # (B, H, Q, d)
        return out.numpy()

    _registered = True


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))  # ORT's buffers are read-only


def is_plugin_graph(model: onnx.ModelProto) -> bool:
    """Whether the graph has any node of a plugin domain."""
    return any(n.domain in PLUGIN_DOMAINS for n in model.graph.node)


def contrib_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the plugin nodes moved to ``ai.onnx.contrib`` (see the module docstring)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    moved = 0
    for node in copy.graph.node:
        if (node.domain, node.op_type) in _PLUGIN_NODES:
            node.domain = CONTRIB_DOMAIN
            moved += 1
    left = [f"{n.domain}::{n.op_type}" for n in copy.graph.node if n.domain in PLUGIN_DOMAINS]
    if left:
        raise ValueError(f"nodes of a plugin domain with no reference implementation: {sorted(set(left))}")
    imports = [o for o in copy.opset_import if o.domain not in (*PLUGIN_DOMAINS, CONTRIB_DOMAIN)]
    del copy.opset_import[:]
    copy.opset_import.extend(imports)
    if moved:
        copy.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return copy


def reference_session(model: onnx.ModelProto | bytes, options: Any = None) -> Any:
    """An ONNX Runtime CPU session of a plugin graph (a ``ModelProto`` or its bytes) with the reference ops."""
    import onnxruntime as ort  # lazy: onnxruntime (the exporter imports this module; its check needs it)
    from onnxruntime_extensions import get_library_path  # lazy: onnxruntime-extensions (plugin graphs only)

    register()
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(contrib_copy(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
