"""Task post-processing: class and mask logits -> semantic map, instances, panoptic segments.

detectron2 semantics with HF parameter names. Mask logits (stride 4) are upsampled bilinearly
(align_corners=False) straight to the padded input size, the padding is cropped to the resized image,
and the result is resized bilinearly to the original image size; every decision (argmax, thresholds,
areas, scores) is made at the original size, except in the official semantic-only order
(``semantic_segmentation(..., at_input_size=True)``: class scores combined at the input size, then resized).
HF instead resizes every mask to a fixed 384x384 first, never crops the padding, and decides some things at
384x384: see ``tests/test_postprocess.py`` for the differences kept on purpose.

Images of a batch are handled one at a time (their sizes differ); within an image everything is
tensor-wide, with Python loops only over the few kept segments when assembling the result.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The result types and MASK_STRIDE live in the torch-free module and are re-exported from here; in the results of
# this module their arrays are torch tensors.
from pipeline.postprocess import MASK_STRIDE, InstanceResult, PanopticResult, Segment, check_batch, check_sizes

_SEMANTIC_CHUNK = 1 << 18  # pixels per (K, Q) @ (Q, pixels) product in semantic_segmentation

Size = tuple[int, int]


# ---------------------------------------------------------------------------------------------- resize
def masks_to_image(mask_logits: torch.Tensor, resized_size: Size, original_size: Size) -> torch.Tensor:
    """Mask logits of one image (N, h, w) at stride 4 -> logits (N, H, W) at the original image size.

    Bilinear (align_corners=False) to the padded input size (4h, 4w), crop to ``resized_size``, bilinear
    to ``original_size``. Only the rows/columns the crop needs are upsampled; the result is the same as
    upsampling everything (the upsampling is local and the scale stays exactly 4).
    """
    n, h, w = mask_logits.shape
    (rh, rw), (oh, ow) = check_sizes((h, w), resized_size, original_size)
    if n == 0:
        return mask_logits.new_zeros((0, oh, ow))
    # An output row y < rh reads input rows floor((y + 0.5) / 4 - 0.5) and the next one, both < ceil(rh / 4) + 1.
    hc = min(h, -(-rh // MASK_STRIDE) + 1)
    wc = min(w, -(-rw // MASK_STRIDE) + 1)
    x = mask_logits[None, :, :hc, :wc]  # (1, N, hc, wc)
    x = F.interpolate(x, size=(MASK_STRIDE * hc, MASK_STRIDE * wc), mode="bilinear", align_corners=False)
    x = x[:, :, :rh, :rw]  # crop the padding: (1, N, rh, rw)
    if (rh, rw) != (oh, ow):
        x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
    return x[0]  # (N, H, W)


def _as_float_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.float() if t.dtype != torch.float32 else t


# ---------------------------------------------------------------------------------------------- semantic
@torch.no_grad()
def semantic_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    resized_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    at_input_size: bool = False,
) -> list[torch.Tensor]:
    """Per-pixel class: argmax over ``einsum("qc,qhw->chw", softmax(class)[..., :-1], sigmoid(masks))``.

    Args:
        class_logits: (B, Q, K+1); the last class is "no object".
        mask_logits: (B, Q, h, w) at 1/4 of the padded input.
        resized_sizes: (h, w) of each image inside the padded input.
        original_sizes: (H, W) of each original image.
        at_input_size: False: combine the mask logits resized to the original size (the official code with
            panoptic or instance inference on). True: combine at the input size (x4, padding cropped), then
            resize the (K, h, w) scores to the original size (the official semantic-only configs; this
            holds all K planes at the input size).

    Returns:
        One (H, W) int64 class-id map per image.
    """
    class_logits, mask_logits = _as_float_tensor(class_logits), _as_float_tensor(mask_logits)
    check_batch(class_logits, mask_logits, resized_sizes, original_sizes)
    out = []
    for i in range(class_logits.shape[0]):
        cls = class_logits[i].softmax(-1)[:, :-1].T.contiguous()  # (K, Q)
        if at_input_size:
            rh, rw = int(resized_sizes[i][0]), int(resized_sizes[i][1])
            probs = masks_to_image(mask_logits[i], resized_sizes[i], (rh, rw)).sigmoid_()  # (Q, h, w)
            scores = (cls @ probs.flatten(1)).reshape(-1, rh, rw)  # (K, h, w)
            oh, ow = int(original_sizes[i][0]), int(original_sizes[i][1])
            scores = F.interpolate(scores[None], size=(oh, ow), mode="bilinear", align_corners=False)[0]
            out.append(scores.argmax(0))  # (H, W)
            continue
        probs = masks_to_image(mask_logits[i], resized_sizes[i], original_sizes[i]).sigmoid_()  # (Q, H, W)
        q, h, w = probs.shape
        flat = probs.reshape(q, h * w)  # (Q, H*W)
        labels = torch.empty(h * w, dtype=torch.int64, device=probs.device)
        for start in range(0, h * w, _SEMANTIC_CHUNK):  # bounds the (K, pixels) product
            stop = min(start + _SEMANTIC_CHUNK, h * w)
            labels[start:stop] = (cls @ flat[:, start:stop]).argmax(0)  # (K, n) -> (n,)
        out.append(labels.reshape(h, w))
    return out


# ---------------------------------------------------------------------------------------------- instance
@torch.no_grad()
def instance_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    resized_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    threshold: float | None = None,
    max_instances: int = 100,
    thing_ids: Collection[int] | None = None,
) -> list[InstanceResult]:
    """Instances: the top ``max_instances`` (query, class) pairs, scored.

    The pairs are the top ``max_instances`` by class probability (softmax without "no object"); with
    ``thing_ids``, pairs of other classes are then dropped (the official code with panoptic inference on).
    A pair's mask is its query's logit > 0 at the original size; its score is the class probability times
    the mean sigmoid inside the mask (0 for an empty mask). ``threshold`` None keeps every pair (official);
    a number keeps pairs with score > ``threshold``. Sorted by score, descending. One query can give
    several instances (with different classes and the same mask), as in detectron2.

    Returns:
        One :class:`InstanceResult` per image: masks (N, H, W) bool, labels (N,) int64, scores (N,) float32.
    """
    class_logits, mask_logits = _as_float_tensor(class_logits), _as_float_tensor(mask_logits)
    check_batch(class_logits, mask_logits, resized_sizes, original_sizes)
    num_queries, num_classes = class_logits.shape[1], class_logits.shape[2] - 1
    k = max(0, min(int(max_instances), num_queries * num_classes))
    things = None if thing_ids is None else torch.tensor(sorted(int(t) for t in thing_ids), dtype=torch.int64)
    out = []
    for i in range(class_logits.shape[0]):
        probs = class_logits[i].softmax(-1)[:, :-1]  # (Q, K)
        class_scores, flat_idx = probs.flatten().topk(k)  # (k,), sorted
        if things is not None:
            is_thing = torch.isin(flat_idx % num_classes, things.to(flat_idx.device))  # (k,)
            class_scores, flat_idx = class_scores[is_thing], flat_idx[is_thing]  # after the top-k, as official
        queries = flat_idx // num_classes
        labels = flat_idx % num_classes
        # The mask score depends on the query only: upsample each selected query once.
        uniq, inverse = torch.unique(queries, return_inverse=True)  # (U,), (k',)
        logits = masks_to_image(mask_logits[i, uniq], resized_sizes[i], original_sizes[i])  # (U, H, W)
        fg = logits > 0  # (U, H, W)
        fg_area = fg.flatten(1).sum(1)  # (U,)
        inside = (logits.sigmoid() * fg).flatten(1).sum(1)  # (U,)
        mask_scores = inside / (fg_area + 1e-6)  # (U,)
        scores = class_scores * mask_scores[inverse]  # (k',)
        keep = torch.arange(len(scores)) if threshold is None else (scores > threshold).nonzero().flatten()
        order = scores[keep].argsort(descending=True, stable=True)
        keep = keep[order]
        masks = fg[inverse[keep]]  # (N, H, W)
        out.append(InstanceResult(masks, labels[keep], scores[keep]))
    return out


# ---------------------------------------------------------------------------------------------- panoptic
@torch.no_grad()
def panoptic_segmentation(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    resized_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    thing_ids: set[int] | frozenset[int],
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
) -> list[PanopticResult]:
    """Panoptic segmentation: non-overlapping segments with ids 1..N, 0 for void.

    Queries whose best class is not "no object" and whose class probability is > ``threshold`` take
    part. Each pixel goes to the query with the highest score * sigmoid(mask); a query's segment is the
    pixels it wins where its own sigmoid >= ``mask_threshold``. A query is dropped when that segment is
    empty, when its own mask (sigmoid >= ``mask_threshold``) is empty, or when won area / own area <
    ``overlap_mask_area_threshold``. Stuff queries (label not in ``thing_ids``) of the same label merge
    into one segment whose score is their highest. Segment ids follow query order.

    Returns:
        One :class:`PanopticResult` per image: the (H, W) int32 id map and the segments.
    """
    class_logits, mask_logits = _as_float_tensor(class_logits), _as_float_tensor(mask_logits)
    check_batch(class_logits, mask_logits, resized_sizes, original_sizes)
    num_classes = class_logits.shape[2] - 1
    out = []
    for i in range(class_logits.shape[0]):
        oh, ow = int(original_sizes[i][0]), int(original_sizes[i][1])
        scores, labels = class_logits[i].softmax(-1).max(-1)  # (Q,), (Q,)
        kept = ((labels != num_classes) & (scores > threshold)).nonzero().flatten()  # (M,)
        if kept.numel() == 0:
            empty = torch.zeros((oh, ow), dtype=torch.int32, device=class_logits.device)
            out.append(PanopticResult(empty, []))
            continue
        scores, labels = scores[kept], labels[kept]
        m = kept.numel()
        probs = masks_to_image(mask_logits[i, kept], resized_sizes[i], original_sizes[i]).sigmoid_()  # (M, H, W)
        winner = (probs * scores[:, None, None]).argmax(0)  # (H, W), first query on ties
        winner_prob = probs.gather(0, winner[None])[0]  # (H, W)
        on = winner_prob >= mask_threshold  # (H, W): the pixel is in its winner's segment
        won_area = torch.bincount(winner.flatten(), minlength=m)  # (M,)
        own_area = (probs >= mask_threshold).flatten(1).sum(1)  # (M,)
        seg_area = torch.bincount(winner[on], minlength=m)  # (M,)
        ratio = won_area.double() / own_area.clamp(min=1).double()
        valid = (seg_area > 0) & (own_area > 0) & (ratio >= overlap_mask_area_threshold)  # (M,)

        # Segment ids in query order; stuff of one label shares the id of its first query.
        query_to_id = torch.zeros(m, dtype=torch.int32)
        segment_label, segment_thing, segment_score = [], [], []
        stuff_id: dict[int, int] = {}
        label_list, score_list = labels.tolist(), scores.tolist()
        for j in valid.nonzero().flatten().tolist():
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
        query_to_id = query_to_id.to(winner.device)
        segmentation = torch.where(on, query_to_id[winner], 0).to(torch.int32)  # (H, W)
        n = len(segment_label)
        areas = torch.bincount(segmentation.flatten().long(), minlength=n + 1).tolist()
        segments = [
            Segment(sid, segment_label[sid - 1], segment_score[sid - 1], segment_thing[sid - 1], areas[sid])
            for sid in range(1, n + 1)
        ]
        out.append(PanopticResult(segmentation, segments))
    return out
