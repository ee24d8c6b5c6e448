"""The plugin ops in PyTorch and their ONNX translations.

Two ``torch.library.custom_op`` ops stand for the plugins while the model is traced:

- ``m2f::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``
  -> (N, Lq, M, D), TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` contract; on the CPU it runs the
  model's own :func:`mask2former.pixel_decoder.ms_deform_attn`.
- ``m2f::masked_attention(q, k, v, mask_logits, scale)`` -> (B, H, Q, d); on the CPU it runs
  :func:`masked_attention_logit_rule` (the PyTorch reference with the kernel's "logit >= 0" rule).

:func:`plugin_ops` makes a model call them: inside it ``mask2former.pixel_decoder.ms_deform_attn`` and
``mask2former.masked_attention.masked_attention`` are replaced by :func:`ms_deform_attn_plugin` and
:func:`masked_attention_plugin` (same arguments, same results), and the model's decoders run with
``use_fused_attention`` (the resized mask logits go to the cross-attention instead of a boolean mask).
Outside it nothing changes, so a standard export is the graph it always was.

:func:`translation_table` is the ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``:
each op becomes one node of its plugin domain (:mod:`model_export.plugins`), built through an onnxscript
``Op`` with a hand-written ``OpSchema`` (onnxscript only calls ops whose schema it has; the schemas are not
registered with ``onnx.defs``, so ``onnx.checker`` treats the nodes as ops of a custom domain).
"""

import contextlib
import itertools
import math
from collections.abc import Iterator

import onnx
import torch
import torch.nn.functional as F
from onnxscript import values
from torch import nn

import mask2former.masked_attention as _masked_attention_module
import mask2former.pixel_decoder as _pixel_decoder
from mask2former.transformer_decoder import TransformerDecoder
from model_export.plugins import (
    MASKED_ATTENTION_DOMAIN,
    MASKED_ATTENTION_NAMESPACE,
    MASKED_ATTENTION_OP,
    MASKED_ATTENTION_VERSION,
    MS_DEFORM_ATTN_DOMAIN,
    MS_DEFORM_ATTN_NAMESPACE,
    MS_DEFORM_ATTN_OP,
    MS_DEFORM_ATTN_VERSION,
)

# The model's implementation, taken before plugin_ops() can swap the module attribute.
_ms_deform_attn_reference = _pixel_decoder.ms_deform_attn


# ---------------------------------------------------------------------------------------------- reference math
def masked_attention_logit_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Masked attention with the fused kernel's rule: attend where ``logit >= 0``.

    Args:
        q: (B, H, Q, d); k, v: (B, H, S, d); mask_logits: (B, Q, S), shared by the heads.
        scale: softmax scale; ``1 / sqrt(d)`` when None.
    Returns:
        (B, H, Q, d), contiguous, in q's dtype.

    :func:`mask2former.masked_attention.masked_attention_reference` with ``logit >= 0`` in place of
    ``sigmoid(logit) >= 0.5``: a row with no attended key attends everywhere; the two differ only for the
    negative logits the sigmoid rounds to 0.5 (float32: -1.79e-7 <= logit < 0, see ``SIGMOID_HALF_BAND_F32``).
    """
    attend = level_attention_mask(mask_logits)  # (B, 1, Q, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale).contiguous()


def level_attention_mask(mask_logits: torch.Tensor) -> torch.Tensor:
    """The boolean mask the plugin derives from a level's mask logits: (B, Q, S) -> (B, 1, Q, S), True = attend."""
    attend = mask_logits >= 0  # (B, Q, S)
    return (attend | ~attend.any(dim=-1, keepdim=True)).unsqueeze(1)


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("m2f::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value (N, S, M, D); spatial_shapes (L, 2) int (H_l, W_l); level_start_index (L,) int; sampling_locations
    (N, Lq, M, L, P, 2) (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P) -> (N, Lq, M, D)."""
    n, s, m, d = value.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = list(itertools.accumulate((h * w for h, w in shapes), initial=0))
    if starts[:-1] != [int(i) for i in level_start_index.tolist()] or starts[-1] != s:
        raise ValueError(
            f"level_start_index {level_start_index.tolist()} and spatial_shapes {shapes} do not describe the "
            f"{s} values: expected starts {starts[:-1]} and {starts[-1]} values"
        )
    out = _ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)  # (N, Lq, M*D)
    return out.reshape(n, sampling_locations.shape[1], m, d).contiguous()  # (N, Lq, M, D)


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m, d))  # (N, Lq, M, D)


@torch.library.custom_op("m2f::masked_attention", mutates_args=())
def masked_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (B, H, Q, d); k, v (B, H, S, d); mask_logits (B, Q, S) -> (B, H, Q, d); see masked_attention_logit_rule."""
    return masked_attention_logit_rule(q, k, v, mask_logits, scale)


@masked_attention_op.register_fake
def _(q, k, v, mask_logits, scale):
    return q.new_empty(q.shape)  # (B, H, Q, d), contiguous like the CPU implementation's


# ---------------------------------------------------------------------------------------------- model hooks
def ms_deform_attn_plugin(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Drop-in for :func:`mask2former.pixel_decoder.ms_deform_attn` through ``m2f::ms_deform_attn``.

    value (B, S, heads, d); shapes [(H_l, W_l)] (ints, or symbolic sizes when exporting); locations
    (B, Sq, heads, L, P, 2); weights (B, Sq, heads, L, P) -> (B, Sq, heads*d). The level sizes become int32
    tensors built with ``full``/``stack`` so that symbolic sizes stay symbolic in the graph.
    """

    def scalar(n: int) -> torch.Tensor:
        return torch.full((), n, dtype=torch.int32, device=value.device)

    spatial_shapes = torch.stack([torch.stack((scalar(h), scalar(w))) for h, w in shapes])  # (L, 2) int32
    starts = itertools.accumulate((h * w for h, w in shapes[:-1]), initial=0)
    level_start_index = torch.stack([scalar(s) for s in starts])  # (L,) int32
    out = torch.ops.m2f.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)  # (B, Sq, M, D)
    return out.flatten(2)  # (B, Sq, heads*d)


def masked_attention_plugin(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_logits: torch.Tensor,
    scale: float | None = None,
    config: object = None,
) -> torch.Tensor:
    """Drop-in for :func:`mask2former.masked_attention.masked_attention` through ``m2f::masked_attention``:
    q (B, H, Q, d), k/v (B, H, S, d), mask_logits (B, Q, S) -> (B, H, Q, d). ``config`` (kernel launch
    options) is ignored: the plugin picks its own."""
    del config
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.m2f.masked_attention(q, k, v, mask_logits, scale)


@contextlib.contextmanager
def plugin_ops(model: nn.Module) -> Iterator[None]:
    """Inside: ``model``'s MSDeformAttn and masked cross-attention call the plugin ops.

    The two module-level functions are swapped for the whole process while inside (trace under it, don't
    serve under it), and every :class:`TransformerDecoder` in ``model`` runs with ``use_fused_attention``.
    Everything is restored on exit.
    """
    decoders = [m for m in model.modules() if isinstance(m, TransformerDecoder)]
    own = [("use_fused_attention" in vars(d), vars(d).get("use_fused_attention")) for d in decoders]
    saved_msda = _pixel_decoder.ms_deform_attn
    saved_masked = _masked_attention_module.masked_attention
    _pixel_decoder.ms_deform_attn = ms_deform_attn_plugin
    _masked_attention_module.masked_attention = masked_attention_plugin
    try:
        for d in decoders:
            d.use_fused_attention = True
        yield
    finally:
        _pixel_decoder.ms_deform_attn = saved_msda
        _masked_attention_module.masked_attention = saved_masked
        for d, (had, value) in zip(decoders, own):
            if had:
                d.use_fused_attention = value
            else:
                del d.use_fused_attention  # back to the class default


# ---------------------------------------------------------------------------------------------- ONNX
def _schema(
    name: str, domain: str, inputs: list[tuple[str, str]], attributes: list[tuple[str, onnx.defs.OpSchema.AttrType]]
) -> onnx.defs.OpSchema:
    schema = onnx.defs.OpSchema
    return schema(
        name,
        domain,
        1,
        inputs=[schema.FormalParameter(n, t) for n, t in inputs],
        outputs=[schema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
        attributes=[schema.Attribute(n, t, required=True) for n, t in attributes],
    )


_STRING = onnx.defs.OpSchema.AttrType.STRING
_PLUGIN_ATTRIBUTES = [("plugin_version", _STRING), ("plugin_namespace", _STRING)]

_MS_DEFORM_ATTN = values.Op(
    values.Opset(MS_DEFORM_ATTN_DOMAIN, 1),
    MS_DEFORM_ATTN_OP,
    _schema(
        MS_DEFORM_ATTN_OP,
        MS_DEFORM_ATTN_DOMAIN,
        [
            ("value", "T"),
            ("spatial_shapes", "tensor(int32)"),
            ("level_start_index", "tensor(int32)"),
            ("sampling_locations", "T"),
            ("attention_weights", "T"),
        ],
        _PLUGIN_ATTRIBUTES,
    ),
)
_MASKED_ATTENTION = values.Op(
    values.Opset(MASKED_ATTENTION_DOMAIN, 1),
    MASKED_ATTENTION_OP,
    _schema(
        MASKED_ATTENTION_OP,
        MASKED_ATTENTION_DOMAIN,
        [("q", "T"), ("k", "T"), ("v", "T"), ("mask_logits", "T")],
        [("scale", onnx.defs.OpSchema.AttrType.FLOAT), *_PLUGIN_ATTRIBUTES],
    ),
)


def _ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return _MS_DEFORM_ATTN(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        plugin_version=MS_DEFORM_ATTN_VERSION,
        plugin_namespace=MS_DEFORM_ATTN_NAMESPACE,
    )


def _masked_attention_onnx(q, k, v, mask_logits, scale: float):
    return _MASKED_ATTENTION(
        q,
        k,
        v,
        mask_logits,
        scale=scale,
        plugin_version=MASKED_ATTENTION_VERSION,
        plugin_namespace=MASKED_ATTENTION_NAMESPACE,
    )


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: custom op -> plugin node."""
    return {
        torch.ops.m2f.ms_deform_attn.default: _ms_deform_attn_onnx,
        torch.ops.m2f.masked_attention.default: _masked_attention_onnx,
    }
