"""Fused masked attention for the decoder's cross-attention (Triton), and its PyTorch reference.

``out = softmax(q k^T * scale + M) v`` where ``M`` comes from the previous prediction's mask logits at
the attended level: 0 where logit >= 0 (sigmoid >= 0.5), -inf where logit < 0, and 0 for the whole row
of a query blocked everywhere. The mask logits (B, Q, S) are shared by all heads.

The kernel never materializes the (B, heads, Q, S) mask or scores. One program owns a tile of
``BLOCK_Q`` query rows of one (batch, head) and streams over S in ``BLOCK_S`` tiles with a flash-attention
online softmax (exp2 domain, fp32 state). The "row blocked everywhere" rule is folded into that single pass
as a lexicographic softmax: each row carries a flag ``opened`` (an attended key has been seen).

- While a row has seen only blocked keys, it accumulates the *unmasked* softmax over everything so far.
- In the tile where its first attended key appears, the state is discarded (rescale factor 0) and from then
  on only attended keys contribute.

At the end a row that never opened holds the plain softmax over all S (the "attends everywhere" rule) and
every other row the softmax over its attended keys only. So there is no pre-pass over the mask logits, no
second pass, and one accumulator; the extra cost is a row-wise max of the attend flags per tile.

For few programs (batch 1, 100 queries, 8 heads is 16 programs of 64 rows) the S axis is split across
programs (flash-decoding): each split writes its normalized partial output, its log-sum-exp and its
``opened`` flag, and a second small kernel merges the splits with the same lexicographic rule (splits whose
flag is below the row's best flag are dropped).

On CUDA the kernels are compiled; on the CPU they run only in Triton's interpreter (``TRITON_INTERPRET=1``,
slow, for tests). Whether Triton interprets is fixed when ``triton`` is first imported (its own jitted helpers,
``tl.zeros``, ``tl.max``, are built then), so the variable must be set before that; torch does not import triton.
Forward only: there is no autograd.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from mask2former.attention_mask import attention_mask_at_level

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional; the reference path needs only torch
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634

# In float32, torch's sigmoid rounds to exactly 0.5 for every logit in [-SIGMOID_HALF_BAND_F32, 0): there
# `sigmoid(logit) >= 0.5` (the model's rule) attends while `logit >= 0` (the kernel's rule) blocks. Measured
# over every float32 in that range (contiguous, strided and one-element tensors give the same edge):
# -1.7881390590446244e-07 (bits 0xb43ffffe) gives 0.5, the next float32 below, -1.7881392e-07 (0xb43fffff),
# gives 0.49999997. The edge is just under 3 * 2**-24 = 1.7881393e-07, not 2**-24 (5.96e-08): up to there
# exp(-x) rounds to 1 or 1 + 2**-23, and 1 + exp(-x) then rounds to 2 (2 + 2**-23 is a tie, to even), so
# 1 / (1 + exp(-x)) is exactly 0.5. In half precision the model
# computes the sigmoid in the logits' dtype and the band is wider: |logit| <= 2**-11 (4.9e-4) for float16,
# <= 2**-8 (3.9e-3) for bfloat16. On a GPU, torch's CUDA sigmoid may put the float32 edge an ulp or so away.
SIGMOID_HALF_BAND_F32 = 1.7881390590446244e-07


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The oracle: the model's existing path, a materialized boolean mask and SDPA.

    Args:
        q: (B, H, Q, d) queries.
        k: (B, H, S, d) keys.
        v: (B, H, S, d) values.
        mask_logits: (B, Q, S) mask logits already resized to the attended level and flattened.
        scale: softmax scale; ``1 / sqrt(d)`` when None.

    Returns:
        (B, H, Q, d) in the inputs' dtype.

    A key is attended where ``sigmoid(logit) >= 0.5`` computed in the logits' dtype, exactly as
    :func:`mask2former.attention_mask.attention_mask` does; a row with no attended key attends
    everywhere. The kernel's rule ``logit >= 0`` is the same in exact arithmetic; with rounding the two
    disagree only for negative logits that the sigmoid rounds to 0.5: float32 ``-1.788139e-07 <= logit < 0``
    (see ``SIGMOID_HALF_BAND_F32``; the often-quoted ~6e-8 = 2**-24 is a third of the real band), float16
    ``|logit| <= 2**-11``, bfloat16 ``|logit| <= 2**-8``. There the kernel blocks and this attends.
    """
    attend = attention_mask_at_level(mask_logits)  # (B, 1, Q, S): the model's own rule
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale)  # (B, H, Q, d)


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, the only way to run them on the CPU.

    That is decided when ``triton`` is imported (``TRITON_INTERPRET=1`` then), so this looks at one of
    Triton's own jitted helpers rather than at the environment now.
    """
    return triton is not None and not isinstance(tl.zeros, triton.JITFunction)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. ``num_splits`` 0 picks a split of S from the device's SM count."""

    block_q: int = 64
    block_s: int = 64
    num_splits: int = 0
    num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int, device: torch.device) -> KernelConfig:
    if device.type != "cuda":  # the interpreter: numpy per block, Python per tile; small tiles are fastest
        return KernelConfig(block_q=16, block_s=32, num_splits=1, num_warps=1, num_stages=1)
    return KernelConfig(block_q=64, block_s=64 if head_dim <= 64 else 32)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_logits: torch.Tensor,
    scale: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Fused masked attention (forward only).

    Args:
        q: (B, H, Q, d) float16, bfloat16 or float32; d in 16, 32, 64, 128. Any strides.
        k: (B, H, S, d), same dtype and device as ``q``. Any strides.
        v: (B, H, S, d), same dtype and device as ``q``. Any strides.
        mask_logits: (B, Q, S) floating point, any dtype; attend where logit >= 0. Any strides.
        scale: softmax scale; ``1 / sqrt(d)`` when None.
        config: block sizes, S split and launch options; :func:`default_config` when None.

    Returns:
        (B, H, Q, d) contiguous, in the dtype of ``q``; accumulation is in float32.

    Raises:
        RuntimeError: Triton is not installed, or CPU tensors without ``TRITON_INTERPRET=1``.
        ValueError: unsupported dtypes, head size, shapes or devices.
    """
    if triton is None:
        raise RuntimeError("masked_attention needs Triton (pip install triton); use masked_attention_reference")
    _check_inputs(q, k, v, mask_logits)
    interpret = interpreting()
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpret):
        raise RuntimeError(
            f"masked_attention runs its Triton kernel on CUDA devices; got {q.device.type} tensors. On the CPU it"
            " runs only in Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported; slow, for"
            " tests); use masked_attention_reference instead"
        )
    b, h, nq, d = q.shape
    cfg = config or default_config(d, q.device)
    for name in ("block_q", "block_s"):
        size = getattr(cfg, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    if b * h * nq == 0:
        return out
    fwd, combine = _kernels(interpret)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _launch(fwd, combine, q, k, v, mask_logits, out, scale, cfg, interpret)
    return out


def _launch(fwd, combine, q, k, v, mask_logits, out, scale: float, cfg: KernelConfig, interpret: bool) -> None:
    b, h, nq, d = q.shape
    s = k.shape[2]

    q_blocks = triton.cdiv(nq, cfg.block_q)
    s_tiles = triton.cdiv(s, cfg.block_s)
    splits = cfg.num_splits or _auto_splits(b * h * q_blocks, s_tiles, q.device)
    tiles_per_split = triton.cdiv(s_tiles, max(1, min(splits, s_tiles)))
    splits = triton.cdiv(s_tiles, tiles_per_split)  # no empty split: each has >= 1 valid key
    # Triton's interpreter stores bfloat16 as uint16 and its tl.dot multiplies those raw bits as integers; the
    # kernel then upcasts its tiles to float32 before tl.dot, which is exact (what tensor cores compute).
    upcast = interpret and q.dtype == torch.bfloat16
    common = {
        "D": d,
        "BLOCK_Q": cfg.block_q,
        "BLOCK_S": cfg.block_s,
        "IEEE": q.dtype == torch.float32,
        "UPCAST": upcast,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }
    if splits == 1:
        dst, lse, opened = out, out, out  # lse/opened unused without a split
        dst_strides = out.stride()
    else:
        dst = torch.empty((b * h, splits, nq, d), dtype=torch.float32, device=q.device)  # normalized partials
        lse = torch.empty((b * h, splits, nq), dtype=torch.float32, device=q.device)  # log2-sum-exp2 per row
        opened = torch.empty((b * h, splits, nq), dtype=torch.int8, device=q.device)  # 1 = saw an attended key
        # (B, H, splits*Q, d) view of the partials: the kernel adds split * Q rows itself.
        dst_strides = (h * splits * nq * d, splits * nq * d, d, 1)
    fwd[(q_blocks, b * h, splits)](
        q, k, v, mask_logits, dst, lse, opened,
        h, nq, s, tiles_per_split, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *mask_logits.stride(), *dst_strides,
        SPLIT=splits > 1, **common,
    )  # fmt: skip
    if splits > 1:
        combine[(q_blocks, b * h)](
            dst, lse, opened, out, h, nq, splits, *out.stride(),
            D=d, BLOCK_Q=cfg.block_q, num_warps=cfg.num_warps,
        )  # fmt: skip


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or mask_logits.dim() != 3:
        raise ValueError(
            "expected q (B, H, Q, d), k and v (B, H, S, d), mask_logits (B, Q, S); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(mask_logits.shape)}"
        )
    b, h, nq, d = q.shape
    s = k.shape[2]
    if k.shape != (b, h, s, d) or v.shape != (b, h, s, d) or mask_logits.shape != (b, nq, s):
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"mask_logits {tuple(mask_logits.shape)}; expected k, v ({b}, {h}, S, {d}) and mask_logits ({b}, {nq}, S)"
        )
    if s == 0:
        raise ValueError("no keys (S = 0): softmax over an empty set")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not mask_logits.is_floating_point():
        raise ValueError(f"mask_logits must be floating point, got {mask_logits.dtype}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head size d must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    devices = {t.device for t in (q, k, v, mask_logits)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if any(t.requires_grad for t in (q, k, v, mask_logits)) and torch.is_grad_enabled():
        raise ValueError("masked_attention is forward only (no autograd); call it under torch.no_grad()")


def _auto_splits(programs: int, s_tiles: int, device: torch.device) -> int:
    """Split S until there are about two programs per SM, keeping >= 8 tiles per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, s_tiles // 8))


@cache
def _kernels(interpret: bool):
    """(forward, combine) kernels, compiled for the GPU or wrapped by Triton's interpreter.

    Built on first use, in the mode Triton's own helpers were built in at ``import triton`` (the two must
    agree), whatever ``TRITON_INTERPRET`` says by now.
    """
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        return triton.jit(_masked_attention_fwd), triton.jit(_combine_splits)


# Triton kernels (plain functions here; jitted by _kernels). Shapes in comments are block shapes.


def _masked_attention_fwd(
    q_ptr, k_ptr, v_ptr, logit_ptr, out_ptr, lse_ptr, opened_ptr,
    H, NQ, S, tiles_per_split, qk_scale,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_lb, stride_lq, stride_ls,
    stride_ob, stride_oh, stride_oq, stride_od,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
    row_ok = rows < NQ
    dims = tl.arange(0, D)  # (D,)
    keys = tl.arange(0, BLOCK_S)  # (BLOCK_S,)

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qq + dims[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )  # (BLOCK_Q, D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    logit_base = logit_ptr + b * stride_lb + rows[:, None] * stride_lq  # (BLOCK_Q, 1); shared by the heads

    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)  # running max of the kept scores (log2 units)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_Q, D], dtype=tl.float32)
    opened = tl.zeros([BLOCK_Q], dtype=tl.int32)  # 1 once the row has seen an attended key

    start = pid_split * tiles_per_split * BLOCK_S
    end = tl.minimum(S, start + tiles_per_split * BLOCK_S)
    for s0 in range(start, end, BLOCK_S):
        cols = s0 + keys  # (BLOCK_S,)
        col_ok = cols < S
        k_t = tl.load(
            k_base + cols[None, :] * stride_ks + dims[:, None] * stride_kd, mask=col_ok[None, :], other=0.0
        )  # (D, BLOCK_S)
        if UPCAST:
            k_t = k_t.to(tl.float32)
        if IEEE:
            scores = tl.dot(q, k_t, input_precision="ieee")  # (BLOCK_Q, BLOCK_S) fp32
        else:
            scores = tl.dot(q, k_t)
        scores = scores * qk_scale

        logits = tl.load(
            logit_base + cols[None, :] * stride_ls, mask=row_ok[:, None] & col_ok[None, :], other=-1.0
        )  # (BLOCK_Q, BLOCK_S)
        attend = (logits.to(tl.float32) >= 0).to(tl.int32)  # out-of-range keys load -1: never attended
        now_open = tl.maximum(opened, tl.max(attend, axis=1))  # (BLOCK_Q,)
        # Open rows keep their attended keys; rows not (yet) open keep every valid key.
        keep = ((attend + (1 - now_open)[:, None]) > 0) & col_ok[None, :]
        scores = tl.where(keep, scores, float("-inf"))
        m_prev = tl.where(now_open == opened, m_i, float("-inf"))  # a row opening now drops its state
        m_new = tl.maximum(m_prev, tl.max(scores, axis=1))  # finite: the tile keeps >= 1 key per row
        alpha = tl.exp2(m_prev - m_new)  # 0 for a dropped state
        p = tl.exp2(scores - m_new[:, None])  # (BLOCK_Q, BLOCK_S)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_t = tl.load(
            v_base + cols[:, None] * stride_vs + dims[None, :] * stride_vd, mask=col_ok[:, None], other=0.0
        )  # (BLOCK_S, D)
        p_in = p.to(v_ptr.dtype.element_ty)  # probabilities rounded to the input dtype, as tensor cores take them
        if UPCAST:
            v_t = v_t.to(tl.float32)
            p_in = p_in.to(tl.float32)
        if IEEE:
            pv = tl.dot(p_in, v_t, input_precision="ieee")
        else:
            pv = tl.dot(p_in, v_t)
        acc = acc * alpha[:, None] + pv  # (BLOCK_Q, D)
        m_i = m_new
        opened = now_open

    out = acc / l_i[:, None]  # (BLOCK_Q, D)
    out_rows = rows
    if SPLIT:
        out_rows = pid_split * NQ + rows  # partials (B*H, splits, Q, d) seen as (B, H, splits*Q, d)
        stat = (pid_bh * tl.num_programs(2) + pid_split).to(tl.int64) * NQ + rows  # (B*H, splits, Q)
        tl.store(lse_ptr + stat, m_i + tl.log2(l_i), mask=row_ok)
        tl.store(opened_ptr + stat, opened.to(tl.int8), mask=row_ok)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + out_rows[:, None] * stride_oq + dims[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def _combine_splits(
    part_ptr, lse_ptr, opened_ptr, out_ptr,
    H, NQ, SPLITS,
    stride_ob, stride_oh, stride_oq, stride_od,
    D: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    # Merge the S splits of one (batch, head, query block): the same lexicographic softmax, over splits.
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
    row_ok = rows < NQ
    dims = tl.arange(0, D)  # (D,)

    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, D], dtype=tl.float32)
    opened = tl.zeros([BLOCK_Q], dtype=tl.int32)
    for i in range(0, SPLITS):
        stat = (pid_bh * SPLITS + i).to(tl.int64) * NQ + rows  # (BLOCK_Q,)
        lse = tl.load(lse_ptr + stat, mask=row_ok, other=0.0)
        split_open = tl.load(opened_ptr + stat, mask=row_ok, other=0).to(tl.int32)
        part = tl.load(part_ptr + stat[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)  # (BLOCK_Q, D)
        now_open = tl.maximum(opened, split_open)
        m_prev = tl.where(now_open == opened, m_i, float("-inf"))  # an opening split drops the blocked-only state
        lse = tl.where(split_open == now_open, lse, float("-inf"))  # a blocked-only split of an open row counts 0
        m_new = tl.maximum(m_prev, lse)
        alpha = tl.exp2(m_prev - m_new)
        w = tl.exp2(lse - m_new)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * part
        m_i = m_new
        opened = now_open
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_oq + dims[None, :] * stride_od,
        (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
