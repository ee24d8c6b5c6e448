"""Shape and type inference of the two plugin ops, in pure Python (no torch, onnx or tensorrt).

These are what a TensorRT plugin's ``get_output_shapes`` / ``get_output_data_types`` (and its format check)
call, and what the exporter's tests check the traced graph against.

A dimension is an ``int`` >= 0 (a known size), ``-1`` or ``None`` (unknown), or any other object (a symbol:
an ONNX ``dim_param`` name, a TensorRT shape expression). Output dimensions are *picked from* the input
dimensions, never computed, so symbols come back as they went in. Only known sizes are checked against each
other; two different symbols may still be equal at run time, which the plugin's own checks then see.

A dtype is a name: ``"float32"``, ``"float16"``, ``"int32"``...; aliases are accepted (``"float"``,
``"half"``, ``"fp16"``, numpy dtypes, ``torch.float16``, TensorRT's ``DataType.HALF``, ONNX's
``"tensor(float)"``), see :func:`normalize_dtype`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Dim = Any  # int (known), -1 / None (unknown), or a symbol passed through
Shape = Sequence[Dim]

FLOAT_TYPES = ("float32", "float16")
INDEX_TYPE = "int32"  # TensorRT's MultiscaleDeformableAttnPlugin_TRT takes int32 shapes and level starts
# Head sizes the fused Triton kernel supports (mask2former.masked_attention.SUPPORTED_HEAD_DIMS; copied here
# so that this module needs no torch; a test keeps the two equal).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "single": "float32",
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "int": "int32",
    "long": "int64",
    "bf16": "bfloat16",
}


class PluginShapeError(ValueError):
    """Inputs a plugin op cannot take: wrong count, rank, mismatched sizes or an unsupported dtype."""


def normalize_dtype(dtype: Any) -> str:
    """The canonical name of a dtype: ``"float32"``, ``"float16"``, ``"int32"``, ...

    >>> normalize_dtype("half"), normalize_dtype("tensor(float)"), normalize_dtype("DataType.INT32")
    ('float16', 'float32', 'int32')
    """
    name = (dtype.__name__ if isinstance(dtype, type) else str(dtype)).strip().lower()  # np.float16 is a type
    for prefix in ("torch.", "datatype.", "np.", "numpy."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if name.startswith("tensor(") and name.endswith(")"):
        name = name[len("tensor(") : -1]
    return _ALIASES.get(name, name)


def _known(dim: Dim, where: str) -> int | None:
    """The size of a known dimension, None for an unknown one or a symbol."""
    if isinstance(dim, bool):
        raise PluginShapeError(f"{where}: a dimension cannot be a bool ({dim!r})")
    if isinstance(dim, int):
        if dim == -1:
            return None
        if dim < 0:
            raise PluginShapeError(f"{where}: negative dimension {dim} (use -1 or None for unknown)")
        return dim
    return None


def _ranked(op: str, names: Sequence[str], shapes: Sequence[Shape], ranks: Sequence[int]) -> list[tuple[Dim, ...]]:
    if len(shapes) != len(names):
        raise PluginShapeError(f"{op}: expected {len(names)} inputs ({', '.join(names)}), got {len(shapes)}")
    out = []
    for name, shape, rank in zip(names, shapes, ranks):
        shape = tuple(shape)
        if len(shape) != rank:
            raise PluginShapeError(f"{op}: {name} must have rank {rank}, got shape {_show(shape)}")
        for i, d in enumerate(shape):
            _known(d, f"{op}: {name} dim {i}")
        out.append(shape)
    return out


def _same(op: str, what: str, *dims: tuple[str, Dim]) -> None:
    """All known sizes among ``(label, dim)`` pairs are equal."""
    known = [(label, _known(d, f"{op}: {label}")) for label, d in dims]
    sizes = {n for _, n in known if n is not None}
    if len(sizes) > 1:
        listing = ", ".join(f"{label}={n}" for label, n in known if n is not None)
        raise PluginShapeError(f"{op}: {what} must agree: {listing}")


def _expect(op: str, label: str, dim: Dim, size: int) -> None:
    n = _known(dim, f"{op}: {label}")
    if n is not None and n != size:
        raise PluginShapeError(f"{op}: {label} must be {size}, got {n}")


def _show(shape: tuple[Dim, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


# ---------------------------------------------------------------------------------------------- MSDeformAttn
MS_DEFORM_ATTN_INPUTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def ms_deform_attn_shape(
    value: Shape,
    spatial_shapes: Shape,
    level_start_index: Shape,
    sampling_locations: Shape,
    attention_weights: Shape,
) -> tuple[Dim, Dim, Dim, Dim]:
    """Output shape of ``MultiscaleDeformableAttnPlugin_TRT``.

    Args:
        value: (N, S, M, D) values of all levels, flattened and concatenated.
        spatial_shapes: (L, 2) (H_l, W_l) of each level.
        level_start_index: (L,) where each level starts in S.
        sampling_locations: (N, Lq, M, L, P, 2).
        attention_weights: (N, Lq, M, L, P).
    Returns:
        (N, Lq, M, D): ``value[0], sampling_locations[1], value[2], value[3]`` (what TensorRT's
        ``getOutputDimensions`` returns).
    Raises:
        PluginShapeError: wrong ranks, or known sizes that disagree (N, M, L, P, Lq, the trailing 2s).
    """
    op = "MultiscaleDeformableAttnPlugin_TRT"
    v, ss, lsi, loc, w = _ranked(
        op, MS_DEFORM_ATTN_INPUTS, (value, spatial_shapes, level_start_index, sampling_locations, attention_weights),
        (4, 2, 1, 6, 5),
    )  # fmt: skip
    _same(op, "batch N", ("value[0]", v[0]), ("sampling_locations[0]", loc[0]), ("attention_weights[0]", w[0]))
    _same(op, "heads M", ("value[2]", v[2]), ("sampling_locations[2]", loc[2]), ("attention_weights[2]", w[2]))
    _same(
        op,
        "levels L",
        ("spatial_shapes[0]", ss[0]),
        ("level_start_index[0]", lsi[0]),
        ("sampling_locations[3]", loc[3]),
        ("attention_weights[3]", w[3]),
    )
    _same(op, "points P", ("sampling_locations[4]", loc[4]), ("attention_weights[4]", w[4]))
    _same(op, "queries Lq", ("sampling_locations[1]", loc[1]), ("attention_weights[1]", w[1]))
    _expect(op, "spatial_shapes[1]", ss[1], 2)
    _expect(op, "sampling_locations[5]", loc[5], 2)
    return v[0], loc[1], v[2], v[3]


def ms_deform_attn_dtype(
    value: Any, spatial_shapes: Any, level_start_index: Any, sampling_locations: Any, attention_weights: Any
) -> str:
    """Output dtype of ``MultiscaleDeformableAttnPlugin_TRT``: that of ``value``.

    ``value``, ``sampling_locations`` and ``attention_weights`` share float32 or float16; ``spatial_shapes``
    and ``level_start_index`` are int32 (TensorRT's ``supportsFormatCombination``).
    """
    op = "MultiscaleDeformableAttnPlugin_TRT"
    types = dict(
        zip(MS_DEFORM_ATTN_INPUTS, map(normalize_dtype, (value, spatial_shapes, level_start_index,
                                                          sampling_locations, attention_weights)))
    )  # fmt: skip
    if types["value"] not in FLOAT_TYPES:
        raise PluginShapeError(f"{op}: value must be one of {FLOAT_TYPES}, got {types['value']}")
    for name in ("sampling_locations", "attention_weights"):
        if types[name] != types["value"]:
            raise PluginShapeError(f"{op}: {name} must have value's dtype {types['value']}, got {types[name]}")
    for name in ("spatial_shapes", "level_start_index"):
        if types[name] != INDEX_TYPE:
            raise PluginShapeError(f"{op}: {name} must be {INDEX_TYPE}, got {types[name]}")
    return types["value"]


def ms_deform_attn_supports(dtypes: Sequence[Any]) -> bool:
    """Whether the plugin takes these input dtypes (value, spatial_shapes, level_start_index, locations,
    weights) plus, optionally, this output dtype: TensorRT's ``supportsFormatCombination`` for linear formats."""
    try:
        out = ms_deform_attn_dtype(*dtypes[:5])
    except (PluginShapeError, TypeError):
        return False
    return len(dtypes) == 5 or (len(dtypes) == 6 and normalize_dtype(dtypes[5]) == out)


# ---------------------------------------------------------------------------------------------- MaskedAttention
MASKED_ATTENTION_INPUTS = ("q", "k", "v", "mask_logits")


def masked_attention_shape(q: Shape, k: Shape, v: Shape, mask_logits: Shape) -> tuple[Dim, Dim, Dim, Dim]:
    """Output shape of ``m2f::MaskedAttention``.

    Args:
        q: (B, H, Q, d) queries.
        k: (B, H, S, d) keys.
        v: (B, H, S, d) values.
        mask_logits: (B, Q, S), shared by the heads.
    Returns:
        (B, H, Q, d): ``q``'s dims.
    Raises:
        PluginShapeError: wrong ranks, known sizes that disagree, no keys (S = 0), or a known head size d
            the kernel does not support (:data:`SUPPORTED_HEAD_DIMS`).
    """
    op = "MaskedAttention"
    q, k, v, m = _ranked(op, MASKED_ATTENTION_INPUTS, (q, k, v, mask_logits), (4, 4, 4, 3))
    _same(op, "batch B", ("q[0]", q[0]), ("k[0]", k[0]), ("v[0]", v[0]), ("mask_logits[0]", m[0]))
    _same(op, "heads H", ("q[1]", q[1]), ("k[1]", k[1]), ("v[1]", v[1]))
    _same(op, "queries Q", ("q[2]", q[2]), ("mask_logits[1]", m[1]))
    _same(op, "keys S", ("k[2]", k[2]), ("v[2]", v[2]), ("mask_logits[2]", m[2]))
    _same(op, "head size d", ("q[3]", q[3]), ("k[3]", k[3]), ("v[3]", v[3]))
    for label, dim in (("k[2]", k[2]), ("v[2]", v[2]), ("mask_logits[2]", m[2])):
        if _known(dim, label) == 0:
            raise PluginShapeError(f"{op}: no keys ({label} = 0): softmax over an empty set")
    for label, dim in (("q[3]", q[3]), ("k[3]", k[3]), ("v[3]", v[3])):
        d = _known(dim, label)
        if d is not None and d not in SUPPORTED_HEAD_DIMS:
            raise PluginShapeError(f"{op}: head size {label} = {d} is not one of {SUPPORTED_HEAD_DIMS}")
    return q[0], q[1], q[2], q[3]


def masked_attention_dtype(q: Any, k: Any, v: Any, mask_logits: Any) -> str:
    """Output dtype of ``m2f::MaskedAttention``: that of ``q``.

    ``q``, ``k``, ``v`` share float32 or float16; ``mask_logits`` is float32 or float16 (either: the kernel
    compares it with 0 in float32).
    """
    op = "MaskedAttention"
    tq, tk, tv, tm = map(normalize_dtype, (q, k, v, mask_logits))
    if tq not in FLOAT_TYPES:
        raise PluginShapeError(f"{op}: q must be one of {FLOAT_TYPES}, got {tq}")
    if tk != tq or tv != tq:
        raise PluginShapeError(f"{op}: q, k, v must share one dtype, got {tq}, {tk}, {tv}")
    if tm not in FLOAT_TYPES:
        raise PluginShapeError(f"{op}: mask_logits must be one of {FLOAT_TYPES}, got {tm}")
    return tq


def masked_attention_supports(dtypes: Sequence[Any]) -> bool:
    """Whether the plugin takes these input dtypes (q, k, v, mask_logits) plus, optionally, this output dtype."""
    try:
        out = masked_attention_dtype(*dtypes[:4])
    except (PluginShapeError, TypeError):
        return False
    return len(dtypes) == 4 or (len(dtypes) == 5 and normalize_dtype(dtypes[4]) == out)
