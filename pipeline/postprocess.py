"""Task post-processing, numpy only: class and mask logits -> semantic map, instances, panoptic segments.

detectron2 semantics with HF parameter names. Mask logits (stride 4) are upsampled bilinearly
(align_corners=False) straight to the padded input size, the padding is cropped to the resized image, and the
result is resized bilinearly to the original image size; every decision (argmax, thresholds, areas, scores) is
made at the original size, except in the official semantic-only order (``semantic_segmentation(...,
at_input_size=True)``: class scores combined at the input size, then resized). HF instead resizes every mask to
a fixed 384x384 first and never crops the padding: ``tests/test_postprocess.py`` lists the differences kept on
purpose. The same functions written with torch (``tests/torch_postprocess.py``) are the test oracle:
``tests/test_postprocess_numpy.py`` checks that resized logits agree to 1e-5 and every decision agrees except,
rarely, where a value lies within float rounding of its threshold.

The two bilinear resizes (x4 to the padded size, crop, to the original size) are linear along each
axis, so they compose into one (H, h) and one (W, w) matrix per image; the resize is then two banded
matrix products (BLAS, multi-threaded). The tasks resize only the queries that can take part, one column
strip at a time (:class:`Resize`): peak memory is O(H x W) for the maps plus ``STRIP_BYTES`` for the
logits, never (queries, H, W). Instance masks come out as COCO RLE built strip by strip
(:mod:`pipeline.rle`). This module imports numpy, pycocotools (through ``rle``) and the standard library.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from pipeline import rle

TASKS = ("panoptic", "instance", "semantic")
MASK_STRIDE = 4  # mask logits are at 1/4 of the padded input (the only common_stride the config allows)
_SEMANTIC_CHUNK = 1 << 15  # pixels per (pixels, Q) @ (Q, K) product in semantic_segmentation (17 MB at K = 133)
# Post-processing holds the full-size logits of all queries one column strip at a time: (N, H, S) float32
# of at most this many bytes (S >= 1), so its peak memory grows with H x W, not with N x H x W.
STRIP_BYTES = 16 << 20
_ROW_BLOCK = 64  # output rows per product in Resize.strips: each block reads only its band of input rows
_LOGIT_CLIP = 1e4  # non-finite mask logits are clipped to this: in a matrix product an inf spreads NaN (0 * inf)

Size = tuple[int, int]


class InstanceResult(NamedTuple):
    masks: Any  # (N, H, W) bool array
    labels: Any  # (N,) int64 array
    scores: Any  # (N,) float32 array, descending


class Segment(NamedTuple):
    id: int  # 1..N, the value of the segment in PanopticResult.segmentation
    label_id: int
    score: float  # a merged stuff segment has the highest score of its queries
    isthing: bool
    area: int  # pixels at the original image size


class PanopticResult(NamedTuple):
    segmentation: Any  # (H, W) int32 array; 0 = void
    segments: list[Segment]


# ---------------------------------------------------------------------------------------------- resize
def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear (align_corners=False) taps of a 1-D resize, with torch's float32 arithmetic.

    torch's CPU kernel computes the scale in float32 and the source position as a fused multiply-add
    rounded to float32; in float64 the weights would differ from torch's by up to ~1e-4 at 1000 pixels.

    Returns:
        (out,) first input index, (out,) second input index, (out,) their float32 weights.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)  # (out,)
    src = (dst.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32)  # the product is exact in float64
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)  # floor (src >= 0)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    return i0, i1, np.float32(1.0) - lam1, lam1


def _resize_matrix(padded_in: int, resized: int, original: int) -> np.ndarray:
    """The (original, n) float32 matrix of one axis: x4 to the padded size, crop to ``resized``, resize.

    ``n`` <= ``padded_in`` is the number of input positions the crop reads (the columns past it are zero).
    Each row has at most 4 non-zero weights: 2 taps of the second resize, each 2 taps of the first.
    """
    i0, i1, w0, w1 = (t[:resized] for t in _linear_taps(padded_in, MASK_STRIDE * padded_in))  # the crop
    n = int(i1.max()) + 1
    if original == resized:
        rows, cols, weights = np.arange(resized), (i0, i1), (w0, w1)
    else:
        j0, j1, v0, v1 = _linear_taps(resized, original)
        rows = np.arange(original)
        cols = (i0[j0], i1[j0], i0[j1], i1[j1])
        weights = tuple(v.astype(np.float64) * w[j] for v, j in ((v0, j0), (v1, j1)) for w in (w0, w1))
    flat = np.concatenate([rows * n + c for c in cols])  # indices repeat where taps coincide: summed
    out = np.bincount(flat, np.concatenate(weights), minlength=len(rows) * n)  # float64
    return out.astype(np.float32).reshape(len(rows), n)


def _plain_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) float32 matrix of one bilinear (align_corners=False) resize along one axis."""
    i0, i1, w0, w1 = _linear_taps(in_size, out_size)
    rows = np.arange(out_size)
    flat = np.concatenate([rows * in_size + i0, rows * in_size + i1])  # repeated where the taps coincide: summed
    out = np.bincount(flat, np.concatenate([w0, w1]).astype(np.float64), minlength=out_size * in_size)
    return out.astype(np.float32).reshape(out_size, in_size)


def _bands(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows,) first and (rows,) one-past-last column with a non-zero weight, per row of a resize matrix."""
    nz = a != 0
    first = nz.argmax(1)
    last = a.shape[1] - nz[:, ::-1].argmax(1)
    return first, last


@functools.lru_cache(maxsize=64)
def _axis(padded_in: int, resized: int, original: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis' resize matrix and its bands (read-only), cached: a service sees the same sizes again and
    again, and building them costs a few ms at 1333 px."""
    matrix = _resize_matrix(padded_in, resized, original)
    out = (matrix, *_bands(matrix))
    for a in out:
        a.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _plain_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_plain_matrix` and its bands (read-only), cached as :func:`_axis`."""
    matrix = _plain_matrix(in_size, out_size)
    out = (matrix, *_bands(matrix))
    for a in out:
        a.flags.writeable = False
    return out


def _banded_rows(a: np.ndarray, first: np.ndarray, last: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """``out`` (N, R, S) = ``a`` (R, r) @ ``x`` (N, r, S), reading only each block of rows' band of ``x``."""
    for r0 in range(0, a.shape[0], _ROW_BLOCK):
        r1 = min(r0 + _ROW_BLOCK, a.shape[0])
        a0, a1 = int(first[r0:r1].min()), int(last[r0:r1].max())
        np.matmul(a[r0:r1, a0:a1], x[:, a0:a1], out=out[:, r0:r1])


class Resize:
    """The x4 + crop + resize of one image's mask logits, evaluated column strip by column strip.

    Each axis is one precomputed (H, h') or (W, w') matrix (see :func:`_resize_matrix`); each output pixel
    reads at most 4 inputs per axis, so the products take only the band of inputs a strip or a block of
    rows needs. Peak memory is one strip, not (N, H, W): a strip of S columns is (N, H, S) float32.
    """

    def __init__(self, logit_size: Size, resized_size: Size, original_size: Size):
        h, w = logit_size
        (rh, rw), (self.height, self.width) = check_sizes((h, w), resized_size, original_size)
        self.ah, self.h_first, self.h_last = _axis(h, rh, self.height)  # (H, hc), (H,), (H,)
        self.aw, self.w_first, self.w_last = _axis(w, rw, self.width)  # (W, wc), (W,), (W,)

    def strip_width(self, planes: int, max_bytes: float) -> int:
        """Columns per strip so that (planes, H, S) float32 fits in ``max_bytes`` (at least 1)."""
        return int(max(1, min(self.width, max_bytes // max(planes * self.height * 4, 1))))

    def strips(
        self, mask_logits: np.ndarray, max_bytes: float = float("inf"), column_major: bool = False
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(N, h, w) mask logits -> (c0, c1, (N, H, c1 - c0) float32 logits) for consecutive column strips.

        With ``column_major``, each strip is (N, c1 - c0, H) instead: column by column, the pixel order of
        COCO RLE, so that run-length encoding reads it as is (no transposed copy of a full-size strip).
        Every strip is written into the same buffer (callers may modify it in place): copy what you keep.
        """
        hc, wc = self.ah.shape[1], self.aw.shape[1]
        x = np.asarray(mask_logits)[:, :hc, :wc]  # (N, hc, wc)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            x = np.clip(np.nan_to_num(x, nan=0.0), -_LOGIT_CLIP, _LOGIT_CLIP)  # NaN -> 0 (torch: NaN)
        if column_major:
            x = np.ascontiguousarray(x.transpose(0, 2, 1))  # (N, wc, hc), small: the logits at stride 4
            ah_t = np.ascontiguousarray(self.ah.T)  # (hc, H)
        n, height = x.shape[0], self.height
        step = self.strip_width(n, max_bytes)
        buffer = np.empty(n * height * step, dtype=np.float32)  # one strip's memory, reused by every strip
        for c0 in range(0, self.width, step):
            c1 = min(c0 + step, self.width)
            lo, hi = int(self.w_first[c0:c1].min()), int(self.w_last[c0:c1].max())
            if column_major:
                t = np.matmul(self.aw[c0:c1, lo:hi], x[:, lo:hi])  # (N, S, hc)
                out = buffer[: n * height * (c1 - c0)].reshape(n, c1 - c0, height)  # (N, S, H) contiguous
            else:
                t = np.matmul(x[:, :, lo:hi], self.aw[c0:c1, lo:hi].T)  # (N, hc, S)
                out = buffer[: n * height * (c1 - c0)].reshape(n, height, c1 - c0)  # (N, H, S) contiguous
            for r0 in range(0, height, _ROW_BLOCK):
                r1 = min(r0 + _ROW_BLOCK, height)
                a0, a1 = int(self.h_first[r0:r1].min()), int(self.h_last[r0:r1].max())
                if column_major:
                    np.matmul(t[:, :, a0:a1], ah_t[a0:a1, r0:r1], out=out[:, :, r0:r1])  # (N, S, B)
                else:
                    np.matmul(self.ah[r0:r1, a0:a1], t[:, a0:a1], out=out[:, r0:r1])  # (N, B, S)
            yield c0, c1, out


def logit_strips(
    mask_logits: np.ndarray,
    resized_size: Size,
    original_size: Size,
    max_bytes: float | None = None,
    column_major: bool = False,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """One image's (N, h, w) logits -> (c0, c1, (N, H, S) logits at the original size) per column strip
    of at most ``max_bytes`` (default: ``STRIP_BYTES``), in one reused buffer; (N, S, H) with
    ``column_major`` (see :meth:`Resize.strips`)."""
    x = np.asarray(mask_logits)
    size = STRIP_BYTES if max_bytes is None else max_bytes
    return Resize(x.shape[-2:], resized_size, original_size).strips(x, size, column_major)


def masks_to_image(mask_logits: np.ndarray, resized_size: Size, original_size: Size) -> np.ndarray:
    """Mask logits of one image (N, h, w) at stride 4 -> logits (N, H, W) at the original image size.

    Bilinear (align_corners=False) to the padded input size (4h, 4w), crop to ``resized_size``, bilinear
    to ``original_size``, as the torch oracle's ``masks_to_image`` (to float rounding), in one
    strip (see :class:`Resize`). The result is a new float32 array (callers may modify it in place).
    """
    x = np.asarray(mask_logits)
    (_, _), (oh, ow) = check_sizes(x.shape[-2:], resized_size, original_size)
    if x.shape[0] == 0:
        return np.zeros((0, oh, ow), dtype=np.float32)
    ((_, _, out),) = Resize(x.shape[-2:], resized_size, original_size).strips(x)
    return out


def check_sizes(logit_size: Size, resized_size: Size, original_size: Size) -> tuple[Size, Size]:
    """Validate one image's sizes against its (h, w) stride-4 logits; returns (resized, original) as ints."""
    h, w = logit_size
    rh, rw = int(resized_size[0]), int(resized_size[1])
    oh, ow = int(original_size[0]), int(original_size[1])
    if not (0 < rh <= MASK_STRIDE * h and 0 < rw <= MASK_STRIDE * w):
        raise ValueError(
            f"resized size {resized_size} does not fit the padded size {(MASK_STRIDE * h, MASK_STRIDE * w)}"
        )
    if oh <= 0 or ow <= 0:
        raise ValueError(f"original size must be positive, got {original_size}")
    return (rh, rw), (oh, ow)


def _sigmoid_(x: np.ndarray) -> np.ndarray:
    """Sigmoid in place (no full-size temporary); returns ``x``."""
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88: 1 / inf = 0, as wanted
        np.negative(x, out=x)
        np.exp(x, out=x)
    x += 1.0
    np.reciprocal(x, out=x)
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32."""
    e = np.exp(x - x.max(-1, keepdims=True))
    e /= e.sum(-1, keepdims=True)
    return e


def _as_float_array(x: Any) -> np.ndarray:
    a = np.asarray(x)
    return a if a.dtype == np.float32 else a.astype(np.float32)


def check_batch(class_logits, mask_logits, resized_sizes, original_sizes) -> None:
    """Validate a batch's shapes and sizes (numpy arrays or torch tensors: only ``ndim``/``shape`` are read)."""
    if class_logits.ndim != 3 or mask_logits.ndim != 4:
        raise ValueError(
            f"expected class_logits (B, Q, K+1) and mask_logits (B, Q, h, w), got {tuple(class_logits.shape)} "
            f"and {tuple(mask_logits.shape)}"
        )
    b, q = class_logits.shape[:2]
    if tuple(mask_logits.shape[:2]) != (b, q):
        raise ValueError(
            f"class_logits {tuple(class_logits.shape)} and mask_logits {tuple(mask_logits.shape)} disagree"
        )
    if len(resized_sizes) != b or len(original_sizes) != b:
        raise ValueError(f"batch of {b} but {len(resized_sizes)} resized and {len(original_sizes)} original sizes")


# ---------------------------------------------------------------------------------------------- semantic
def semantic_segmentation(
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    resized_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    at_input_size: bool = False,
) -> list[np.ndarray]:
    """Per-pixel class: argmax over ``einsum("qc,qhw->chw", softmax(class)[..., :-1], sigmoid(masks))``.

    Args:
        class_logits: (B, Q, K+1); the last class is "no object".
        mask_logits: (B, Q, h, w) at 1/4 of the padded input.
        resized_sizes: (h, w) of each image inside the padded input.
        original_sizes: (H, W) of each original image.
        at_input_size: where the class scores are combined. False: from the mask logits resized to the
            original size (the official code when panoptic or instance inference is on, i.e.
            ``SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE`` forced true). True: at the input size (x4, padding
            cropped), the (K, h, w) scores then resized to the original size (the official semantic-only
            configs). Both agree where the image is not resized.

    Returns:
        One (H, W) int64 class-id map per image.
    """
    class_logits, mask_logits = _as_float_array(class_logits), _as_float_array(mask_logits)
    check_batch(class_logits, mask_logits, resized_sizes, original_sizes)
    out = []
    for i in range(class_logits.shape[0]):
        cls = _softmax(class_logits[i])[:, :-1]  # (Q, K)
        if at_input_size:
            out.append(_semantic_at_input_size(cls, mask_logits[i], resized_sizes[i], original_sizes[i]))
            continue
        oh, ow = int(original_sizes[i][0]), int(original_sizes[i][1])
        labels = np.empty((oh, ow), dtype=np.int64)  # (H, W)
        for c0, c1, probs in logit_strips(mask_logits[i], resized_sizes[i], original_sizes[i]):
            _sigmoid_(probs)  # (Q, H, S)
            labels[:, c0:c1] = _argmax_classes(cls, probs)
        out.append(labels)
    return out


def _argmax_classes(cls: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(Q, K) class probabilities and (Q, H, S) mask probabilities -> (H, S) int64 best class (first on ties)."""
    q, h, s = probs.shape
    flat = probs.reshape(q, h * s)  # (Q, H*S)
    labels = np.empty(h * s, dtype=np.int64)
    for start in range(0, h * s, _SEMANTIC_CHUNK):  # bounds the (pixels, K) product
        stop = min(start + _SEMANTIC_CHUNK, h * s)
        labels[start:stop] = (flat[:, start:stop].T @ cls).argmax(1)  # (n, K) -> (n,)
    return labels.reshape(h, s)


def _semantic_at_input_size(cls: np.ndarray, mask_logits: np.ndarray, resized_size: Size, original_size: Size):
    """One image's semantic map with the class scores combined at the input size, then resized.

    The official form holds (K, h, w) scores at the input size; here they are made and resized one column
    strip of the output at a time: the strip's band of input columns is upsampled (x4, cropped) from the
    logits, combined into class scores, resized to the original size (rows in bands) and reduced to its argmax.
    Peak memory: the (H, W) map plus four (Q or K, rows, columns) arrays of about ``STRIP_BYTES`` each.
    """
    x = np.asarray(mask_logits)  # (Q, h', w') at stride 4
    (rh, rw), (oh, ow) = check_sizes(x.shape[-2:], resized_size, original_size)
    if not np.isfinite(x).all():
        x = np.clip(np.nan_to_num(x, nan=0.0), -_LOGIT_CLIP, _LOGIT_CLIP)
    up_h, up_h_first, up_h_last = _axis(x.shape[1], rh, rh)  # (h, hc): x4 and crop, rows
    up_w, up_w_first, up_w_last = _axis(x.shape[2], rw, rw)  # (w, wc): x4 and crop, columns
    down_h, down_h_first, down_h_last = _plain_axis(rh, oh)  # (H, h)
    down_w, down_w_first, down_w_last = _plain_axis(rw, ow)  # (W, w)
    x = x[:, : up_h.shape[1], : up_w.shape[1]]  # (Q, hc, wc): the logits the crop reads
    q, k = cls.shape
    # Output columns per strip: its input band is about S * w / W + 2 columns of (max(Q, K), max(h, H)) planes.
    per_column = 4 * max(q, k) * max(rh, oh) * max(1.0, rw / ow)
    step = int(max(1, min(ow, (STRIP_BYTES // max(per_column, 1)) - 2)))
    labels = np.empty((oh, ow), dtype=np.int64)  # (H, W)
    for c0 in range(0, ow, step):
        c1 = min(c0 + step, ow)
        lo, hi = int(down_w_first[c0:c1].min()), int(down_w_last[c0:c1].max())  # input columns of the strip
        a0, a1 = int(up_w_first[lo:hi].min()), int(up_w_last[lo:hi].max())  # logit columns of those
        t = np.matmul(x[:, :, a0:a1], up_w[lo:hi, a0:a1].T)  # (Q, hc, b)
        probs = np.empty((q, rh, hi - lo), dtype=np.float32)  # (Q, h, b)
        _banded_rows(up_h, up_h_first, up_h_last, t, probs)
        _sigmoid_(probs)
        scores = (cls.T @ probs.reshape(q, -1)).reshape(k, rh, hi - lo)  # (K, h, b)
        cols = np.matmul(scores, down_w[c0:c1, lo:hi].T)  # (K, h, S)
        resized = np.empty((k, oh, c1 - c0), dtype=np.float32)  # (K, H, S)
        _banded_rows(down_h, down_h_first, down_h_last, cols, resized)
        labels[:, c0:c1] = resized.argmax(0)  # first class on ties
    return labels


# ---------------------------------------------------------------------------------------------- instance
class InstanceRLEs(NamedTuple):
    """Instances with their masks as COCO RLE (what the service answers); ``masks`` decodes them."""

    rles: list[dict[str, Any]]  # N COCO RLEs {"size": [H, W], "counts": str}
    labels: Any  # (N,) int64 array
    scores: Any  # (N,) float32 array, descending
    size: Size  # (H, W)

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool, decoded from the RLEs (the dense form: N x H x W bytes)."""
        return rle.decode(self.rles, self.size)


def instance_rles(
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    resized_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    threshold: float | None = None,
    max_instances: int = 100,
    thing_ids: Collection[int] | None = None,
) -> list[InstanceRLEs]:
    """Instances: the top ``max_instances`` (query, class) pairs, scored; masks as COCO RLE.

    The pairs are the top ``max_instances`` by class probability (softmax without "no object"); with
    ``thing_ids``, pairs of other classes are then dropped (the official code does this, after its top-k,
    when panoptic inference is on: instances are things). A pair's mask is its query's logit > 0 at the
    original size; its score is the class probability times the mean sigmoid inside the mask (0 for an
    empty mask). ``threshold`` None keeps every pair, as the official code does; a number keeps pairs with
    score > ``threshold``. Results are sorted by score, descending. One query can give several instances
    (with different classes and the same mask), as in detectron2. Equal class probabilities (top-k) and
    equal scores (the final order) keep the lower query*K + class index first (stable sorts; the official
    top-k leaves the order of ties unspecified).

    Only the queries of pairs that can pass are resized (the mean sigmoid is at most 1, so a pair whose
    class probability is <= ``threshold`` cannot), one column strip at a time, and their masks are
    run-length encoded strip by strip: no (N, H, W) array is made.
    """
    class_logits, mask_logits = _as_float_array(class_logits), _as_float_array(mask_logits)
    check_batch(class_logits, mask_logits, resized_sizes, original_sizes)
    num_queries, num_classes = class_logits.shape[1], class_logits.shape[2] - 1
    k = max(0, min(int(max_instances), num_queries * num_classes))
    things = None if thing_ids is None else np.fromiter((int(t) for t in thing_ids), dtype=np.int64)
    out = []
    for i in range(class_logits.shape[0]):
        class_probs = _softmax(class_logits[i])[:, :-1].reshape(-1)  # (Q*K,)
        flat_idx = np.argsort(-class_probs, kind="stable")[:k]  # (k,), by class probability, descending
        if things is not None:
            flat_idx = flat_idx[np.isin(flat_idx % num_classes, things)]  # (k',) after the top-k, as official
        if threshold is not None:
            flat_idx = flat_idx[class_probs[flat_idx] > threshold]  # (k',) the pairs that can pass
        class_scores = class_probs[flat_idx]
        queries = flat_idx // num_classes
        labels = flat_idx % num_classes
        # The mask score depends on the query only: resize each selected query once.
        uniq, inverse = np.unique(queries, return_inverse=True)  # (U,), (k',)
        oh, ow = int(original_sizes[i][0]), int(original_sizes[i][1])
        runs = rle.StripRuns(len(uniq), oh, ow)
        fg_area = np.zeros(len(uniq), dtype=np.int64)  # (U,)
        inside = np.zeros(len(uniq), dtype=np.float64)  # (U,) sum of sigmoid over the mask
        if len(uniq):
            strips = logit_strips(mask_logits[i, uniq], resized_sizes[i], original_sizes[i], column_major=True)
            for _, _, logits in strips:
                u, s, h = logits.shape  # (U, S, H): column-major, as RLE reads it
                fg = logits > 0
                runs.add(fg)
                fg_area += np.count_nonzero(fg.reshape(u, s * h), axis=1)
                probs = _sigmoid_(logits)  # in place
                probs *= fg
                inside += probs.reshape(u, s * h).sum(1, dtype=np.float64)
        rles = runs.rles()  # (U,)
        mask_scores = inside.astype(np.float32) / (fg_area.astype(np.float32) + np.float32(1e-6))  # (U,)
        scores = class_scores * mask_scores[inverse]  # (k',) float32
        keep = np.arange(len(scores)) if threshold is None else np.flatnonzero(scores > threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        out.append(
            InstanceRLEs(
                [rles[j] for j in inverse[keep].tolist()],
                labels[keep].astype(np.int64),
                scores[keep].astype(np.float32),
                (oh, ow),
            )
        )
    return out


def instance_segmentation(
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    resized_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    threshold: float | None = None,
    max_instances: int = 100,
    thing_ids: Collection[int] | None = None,
) -> list[InstanceResult]:
    """:func:`instance_rles` with the masks decoded: one :class:`InstanceResult` per image, masks (N, H, W)
    bool, labels (N,) int64, scores (N,) float32."""
    results = instance_rles(
        class_logits, mask_logits, resized_sizes, original_sizes, threshold, max_instances, thing_ids
    )
    return [InstanceResult(r.masks, r.labels, r.scores) for r in results]


# ---------------------------------------------------------------------------------------------- panoptic
def _panoptic_strip(
    probs: np.ndarray, scores: np.ndarray, mask_threshold: float, own_area: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One strip's decision: (M, H, S) sigmoids -> (H, S) int32 winner and (H, S) bool "in its segment".

    Argmax over queries of score * prob, one (H, S) plane at a time (no (M, H, S) temporary); adds each
    query's own area (prob >= ``mask_threshold``) in the strip to ``own_area`` (M,).
    """
    m = probs.shape[0]
    winner = np.zeros(probs.shape[1:], dtype=np.int32)  # (H, S)
    best = probs[0] * scores[0]  # (H, S)
    winner_prob = probs[0].copy()  # (H, S)
    weighted = np.empty_like(best)  # (H, S)
    better = np.empty(best.shape, dtype=bool)  # (H, S)
    own_area[0] += np.count_nonzero(probs[0] >= mask_threshold)
    for j in range(1, m):
        np.multiply(probs[j], scores[j], out=weighted)
        np.greater(weighted, best, out=better)  # strict: the first query wins ties
        np.copyto(winner, j, where=better)
        np.copyto(winner_prob, probs[j], where=better)
        np.copyto(best, weighted, where=better)
        own_area[j] += np.count_nonzero(probs[j] >= mask_threshold)
    return winner, winner_prob >= mask_threshold


def panoptic_segmentation(
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    resized_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    thing_ids: set[int] | frozenset[int],
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
) -> list[PanopticResult]:
    """Panoptic segmentation: non-overlapping segments with ids 1..N, 0 for void.

    Queries whose best class is not "no object" and whose class probability is > ``threshold`` take
    part. Each pixel goes to the query with the highest score * sigmoid(mask) (the first on ties); a
    query's segment is the pixels it wins where its own sigmoid >= ``mask_threshold``. A query is dropped
    when that segment is empty, when its own mask (sigmoid >= ``mask_threshold``) is empty, or when won
    area / own area < ``overlap_mask_area_threshold``. Stuff queries (label not in ``thing_ids``) of the
    same label merge into one segment whose score is their highest. Segment ids follow query order.
    Only the taking-part queries are resized, one column strip at a time (full-size memory: the maps).

    Returns:
        One :class:`PanopticResult` per image: the (H, W) int32 id map and the segments.
    """
    class_logits, mask_logits = _as_float_array(class_logits), _as_float_array(mask_logits)
    check_batch(class_logits, mask_logits, resized_sizes, original_sizes)
    num_classes = class_logits.shape[2] - 1
    out = []
    for i in range(class_logits.shape[0]):
        oh, ow = int(original_sizes[i][0]), int(original_sizes[i][1])
        probs = _softmax(class_logits[i])  # (Q, K+1)
        labels = probs.argmax(-1)  # (Q,)
        scores = np.take_along_axis(probs, labels[:, None], -1)[:, 0]  # (Q,)
        kept = np.flatnonzero((labels != num_classes) & (scores > threshold))  # (M,)
        if kept.size == 0:
            out.append(PanopticResult(np.zeros((oh, ow), dtype=np.int32), []))
            continue
        scores, labels = scores[kept], labels[kept]
        m = kept.size
        winner = np.empty((oh, ow), dtype=np.int32)  # (H, W) index into kept
        on = np.empty((oh, ow), dtype=bool)  # (H, W): the pixel is in its winner's segment
        own_area = np.zeros(m, dtype=np.int64)  # (M,)
        for c0, c1, logits in logit_strips(mask_logits[i, kept], resized_sizes[i], original_sizes[i]):
            winner[:, c0:c1], on[:, c0:c1] = _panoptic_strip(_sigmoid_(logits), scores, mask_threshold, own_area)
        won_area = np.bincount(winner.reshape(-1), minlength=m)  # (M,)
        seg_area = np.bincount(winner[on], minlength=m)  # (M,)
        ratio = won_area / np.maximum(own_area, 1)  # float64
        valid = (seg_area > 0) & (own_area > 0) & (ratio >= overlap_mask_area_threshold)  # (M,)

        # Segment ids in query order; stuff of one label shares the id of its first query.
        query_to_id = np.zeros(m, dtype=np.int32)
        segment_label, segment_thing, segment_score = [], [], []
        stuff_id: dict[int, int] = {}
        label_list, score_list = labels.tolist(), scores.tolist()
        for j in np.flatnonzero(valid).tolist():
            label, score = label_list[j], score_list[j]
            isthing = label in thing_ids
            if not isthing and label in stuff_id:
                sid = stuff_id[label]
                segment_score[sid - 1] = max(segment_score[sid - 1], score)
            else:
                segment_label.append(label)
                segment_thing.append(isthing)
                segment_score.append(score)
                sid = len(segment_label)
                if not isthing:
                    stuff_id[label] = sid
            query_to_id[j] = sid
        segmentation = query_to_id[winner]  # (H, W) int32
        segmentation[~on] = 0
        n = len(segment_label)
        areas = np.bincount(segmentation.reshape(-1), minlength=n + 1).tolist()
        segments = [
            Segment(sid, segment_label[sid - 1], segment_score[sid - 1], segment_thing[sid - 1], areas[sid])
            for sid in range(1, n + 1)
        ]
        out.append(PanopticResult(segmentation, segments))
    return out
