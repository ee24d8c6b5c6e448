"""Task post-processing: hand-made logits with known answers, and agreement with HF where both must agree.

HF's ``post_process_*`` (transformers 5.23) differs from ours (detectron2 semantics) in general:

- it resizes mask logits to a fixed 384x384 first, then to the target size (semantic: after the einsum,
  on class scores; instance: the binary masks, nearest; panoptic: the probabilities), and decides
  instance mask scores and panoptic areas at 384x384;
- it never crops the padding: the padded area is stretched into the target size;
- instance: ``score >= threshold`` (we: ``>``) plus a separate "mask not empty" rule (we: an empty mask
  scores 0, so it goes at any threshold >= 0), top-k with k = num_queries (we: ``max_instances``), results
  in top-k order unsorted (we: by score, descending), ids from 0 with -1 as background;
- panoptic: a segment is every pixel the query wins (we also require its sigmoid >= ``mask_threshold``,
  as detectron2 does), a segment is kept when won/own area ``>`` the overlap threshold (we: ``>=``), a
  fused stuff label gets one ``segments_info`` entry per query (we: one segment, with the highest score),
  scores are rounded to 6 decimals, and the void value is -1 when no query passes (0 otherwise; ours is
  always 0).

The HF comparisons therefore use 96x96 mask logits, no padding and 384x384 target sizes (HF's fixed
step is then the identity and our crop/resize are no-ops), and random logits, where equalities at a
threshold have probability zero.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_postprocess import (
    InstanceResult,
    PanopticResult,
    Segment,
    instance_segmentation,
    masks_to_image,
    panoptic_segmentation,
    semantic_segmentation,
)

HF_SIZE = 384  # HF's fixed intermediate size; mask logits of 96x96 upsample to it exactly (stride 4)
SCORE_TOL = 1e-6  # HF rounds scores to 6 decimals


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from transformers import Mask2FormerImageProcessorPil  # what Mask2FormerImageProcessor is without torchvision

    return Mask2FormerImageProcessorPil()


def random_logits(seed: int, batch: int = 2, queries: int = 8, classes: int = 5, size: int = 96):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=g) * 3
    mask_logits = torch.randn(batch, queries, size // 8, size // 8, generator=g) * 4
    # Smooth masks: blobs rather than per-pixel noise, as a model would give.
    mask_logits = F.interpolate(mask_logits, size=(size, size), mode="bilinear", align_corners=False)
    return class_logits, mask_logits


def hf_outputs(class_logits, mask_logits):
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


def hf_call(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("seed", [0, 1])
def test_semantic_matches_hf(hf, seed):
    # Differs from HF in general: HF resizes class scores (after the einsum) from 384x384 to the target; we
    # resize mask logits (before the sigmoid) from the cropped padded size.
    cl, ml = random_logits(seed)
    sizes = [(HF_SIZE, HF_SIZE)] * 2
    ours = semantic_segmentation(cl, ml, sizes, sizes)
    ref = hf.post_process_semantic_segmentation(hf_outputs(cl, ml), target_sizes=sizes)
    for o, r in zip(ours, ref):
        assert o.dtype == torch.int64 and o.shape == (HF_SIZE, HF_SIZE)
        assert torch.equal(o, r)


@pytest.mark.parametrize(("seed", "threshold"), [(0, 0.0), (1, 0.3), (2, 0.6)])
def test_instance_matches_hf(hf, seed, threshold):
    # Differs from HF in general: HF scores masks at 384x384 and resizes the binary masks (nearest); we
    # threshold and score at the original size. Threshold: HF >=, we > (equal only with probability zero).
    cl, ml = random_logits(seed)
    ml[0, 3] = -5.0  # an empty mask: HF drops it explicitly, ours scores it 0 (not > 0)
    sizes = [(HF_SIZE, HF_SIZE)] * 2
    queries = cl.shape[1]
    ours = instance_segmentation(cl, ml, sizes, sizes, threshold=threshold, max_instances=queries)
    ref = hf.post_process_instance_segmentation(
        hf_outputs(cl, ml), threshold=threshold, target_sizes=sizes, return_binary_maps=True
    )
    for o, r in zip(ours, ref):
        info = r["segments_info"]
        order = sorted(range(len(info)), key=lambda j: -info[j]["score"])  # HF: top-k order, unsorted
        assert len(o.scores) == len(info) > 0
        assert o.labels.tolist() == [info[j]["label_id"] for j in order]
        ref_scores = torch.tensor([info[j]["score"] for j in order])
        assert torch.allclose(o.scores, ref_scores, atol=SCORE_TOL, rtol=0)
        assert torch.equal(o.masks, r["segmentation"][order].bool())


def dedup_hf_segments(info: list[dict]) -> list[tuple[int, int, float]]:
    """HF lists a fused stuff segment once per query: one (id, label, highest score) per id."""
    by_id: dict[int, tuple[int, int, float]] = {}
    for s in info:
        prev = by_id.get(s["id"])
        score = s["score"] if prev is None else max(prev[2], s["score"])
        by_id[s["id"]] = (s["id"], s["label_id"], score)
    return [by_id[k] for k in sorted(by_id)]


@pytest.mark.parametrize(("seed", "overlap"), [(0, 0.05), (1, 0.2), (2, 0.1)])
def test_panoptic_matches_hf_without_mask_threshold(hf, seed, overlap):
    # With mask_threshold=0 every pixel a query wins is in its segment for both (HF never applies
    # mask_threshold to the segment), and every pixel is in its own mask, so the rules coincide; a won/own
    # ratio equal to the overlap threshold (HF >, we >=) cannot happen with 384*384 pixels and these values.
    cl, ml = random_logits(seed, queries=10, classes=6)
    things = {0, 1, 2}
    stuff = {3, 4, 5}
    sizes = [(HF_SIZE, HF_SIZE)] * 2
    kw = dict(threshold=0.3, mask_threshold=0.0, overlap_mask_area_threshold=overlap)
    ours = panoptic_segmentation(cl, ml, sizes, sizes, thing_ids=things, **kw)
    ref = hf_call(
        hf.post_process_panoptic_segmentation, hf_outputs(cl, ml), label_ids_to_fuse=stuff, target_sizes=sizes, **kw
    )
    fused = 0
    for o, r in zip(ours, ref):
        assert o.segmentation.dtype == torch.int32
        assert torch.equal(o.segmentation, r["segmentation"])
        expected = dedup_hf_segments(r["segments_info"])
        assert len(o.segments) == len(expected) > 0
        for seg, (sid, label, score) in zip(o.segments, expected):
            assert (seg.id, seg.label_id, seg.isthing) == (sid, label, label in things)
            assert abs(seg.score - score) <= SCORE_TOL
            assert seg.area == int((r["segmentation"] == sid).sum())
        fused += len(r["segments_info"]) - len(expected)
    if seed == 0:
        assert fused > 0  # this seed exercises the stuff merge


def test_panoptic_with_mask_threshold_is_hf_restricted_to_confident_pixels(hf):
    # With mask_threshold=0.5, our segment is HF's segment minus the pixels where the winning query's
    # sigmoid is below 0.5 (those are void for us, as in detectron2).
    cl, ml = random_logits(3, queries=10, classes=6)
    things, stuff = {0, 1, 2}, {3, 4, 5}
    sizes = [(HF_SIZE, HF_SIZE)] * 2
    kw = dict(threshold=0.3, mask_threshold=0.5, overlap_mask_area_threshold=0.5)
    ours = panoptic_segmentation(cl, ml, sizes, sizes, thing_ids=things, **kw)
    ref = hf_call(
        hf.post_process_panoptic_segmentation, hf_outputs(cl, ml), label_ids_to_fuse=stuff, target_sizes=sizes, **kw
    )
    probs = F.interpolate(ml, size=(HF_SIZE, HF_SIZE), mode="bilinear", align_corners=False).sigmoid()
    scores, labels = cl.softmax(-1).max(-1)
    dropped_pixels = 0
    for i, (o, r) in enumerate(zip(ours, ref)):
        kept = (labels[i] != cl.shape[-1] - 1) & (scores[i] > 0.3)
        weighted = probs[i][kept] * scores[i][kept][:, None, None]
        winner_prob = probs[i][kept].gather(0, weighted.argmax(0)[None])[0]
        confident = winner_prob >= 0.5
        assert torch.equal(o.segmentation, torch.where(confident, r["segmentation"], 0))
        assert [(s.id, s.label_id) for s in o.segments] == [
            (s, lab) for s, lab, _ in dedup_hf_segments(r["segments_info"])
        ]
        dropped_pixels += int(((r["segmentation"] > 0) & ~confident).sum())
    assert dropped_pixels > 0  # the difference is exercised


# ---------------------------------------------------------------------------------------------- hand-made
# Mask logits at stride 4 whose x4 bilinear upsampling has exact, known edges: a block of POS input pixels
# in a NEG background becomes a positive region exactly 4x as large. On a straight edge the two output
# pixels next to it get 0.625*POS + 0.375*NEG = 6.25 and 0.375*POS + 0.625*NEG = -0.25; at a convex
# corner 0.39*POS + 0.61*NEG = 0.16 > 0, so corners stay square (1.56 < POS/|NEG| < 1.67 makes both hold).
NEG, POS = -10.0, 16.0


def square_logits(queries: int, size: int = 8) -> torch.Tensor:
    """(1, Q, size, size) mask logits, all NEG; set blocks to POS."""
    return torch.full((1, queries, size, size), NEG)


def test_logit_construction_gives_exact_squares():
    ml = square_logits(1)
    ml[0, 0, 1:4, 2:7] = POS
    up = F.interpolate(ml, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[4:16, 8:28] = True
    assert torch.equal(up > 0, expected)


def class_logits_for(labels: list[int], num_classes: int, confidence: float = 8.0) -> torch.Tensor:
    """(1, Q, K+1) logits: query q confidently predicts labels[q] (num_classes = no object)."""
    cl = torch.zeros(1, len(labels), num_classes + 1)
    for q, label in enumerate(labels):
        cl[0, q, label] = confidence
    return cl


def test_masks_to_image_equals_full_upsample_then_crop():
    # Our partial upsampling must equal: upsample everything to the padded size, crop, resize.
    g = torch.Generator().manual_seed(0)
    ml = torch.randn(3, 10, 12, generator=g)
    for resized, original in [((40, 48), (40, 48)), ((37, 45), (37, 45)), ((21, 30), (50, 61)), ((5, 3), (9, 7))]:
        full = F.interpolate(ml[None], size=(40, 48), mode="bilinear", align_corners=False)
        full = full[:, :, : resized[0], : resized[1]]
        if resized != original:
            full = F.interpolate(full, size=original, mode="bilinear", align_corners=False)
        assert torch.equal(masks_to_image(ml, resized, original), full[0])
    with pytest.raises(ValueError, match="does not fit"):
        masks_to_image(ml, (41, 48), (41, 48))


def test_panoptic_two_disjoint_squares():
    # K = 3: label 0 is a thing, 1 and 2 are stuff. Query 0: label 0, top-left quarter; query 1: label 1,
    # bottom-right quarter; query 2: no object, mask everywhere (ignored); query 3: label 2 below the
    # score threshold, mask everywhere (ignored). The ±10 steps upsample (x4) with the edge exactly at 16.
    ml = square_logits(4)
    ml[0, 0, :4, :4] = POS
    ml[0, 1, 4:, 4:] = POS
    ml[0, 2] = POS
    ml[0, 3] = POS
    cl = class_logits_for([0, 1, 3, 2], num_classes=3)
    cl[0, 3] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # best class 2 with probability < 0.8
    (res,) = panoptic_segmentation(cl, ml, [(32, 32)], [(32, 32)], thing_ids={0})
    expected = torch.zeros(32, 32, dtype=torch.int32)
    expected[:16, :16] = 1
    expected[16:, 16:] = 2
    assert isinstance(res, PanopticResult)
    assert torch.equal(res.segmentation, expected)
    probs = cl[0].softmax(-1)
    assert res.segments == [
        Segment(1, 0, pytest.approx(probs[0, 0].item()), True, 256),
        Segment(2, 1, pytest.approx(probs[1, 1].item()), False, 256),
    ]


def test_panoptic_stuff_merges_things_do_not():
    # Queries 0, 1: stuff label 1 in two corners -> one segment. Queries 2, 3: thing label 0 in the two
    # other corners -> two segments. The merged segment takes the higher score (query 1's).
    ml = square_logits(4)
    ml[0, 0, :4, :4] = POS
    ml[0, 1, 4:, 4:] = POS
    ml[0, 2, :4, 4:] = POS
    ml[0, 3, 4:, :4] = POS
    cl = class_logits_for([1, 1, 0, 0], num_classes=2)
    cl[0, 1, 1] = 9.0  # query 1 is more confident than query 0
    (res,) = panoptic_segmentation(cl, ml, [(32, 32)], [(32, 32)], thing_ids={0})
    expected = torch.zeros(32, 32, dtype=torch.int32)
    expected[:16, :16] = 1  # the stuff id is that of its first query
    expected[16:, 16:] = 1
    expected[:16, 16:] = 2
    expected[16:, :16] = 3
    assert torch.equal(res.segmentation, expected)
    probs = cl[0].softmax(-1)
    assert [(s.id, s.label_id, s.isthing, s.area) for s in res.segments] == [
        (1, 1, False, 512),
        (2, 0, True, 256),
        (3, 0, True, 256),
    ]
    assert res.segments[0].score == pytest.approx(probs[1, 1].item())
    assert probs[1, 1] > probs[0, 1]


@pytest.mark.parametrize(
    ("overlap", "kept"), [(0.8, False), (0.6, False), (285 / 512 + 1e-9, False), (285 / 512, True), (0.5, True)]
)
def test_panoptic_overlap_threshold_drops_occluded_segment(overlap, kept):
    # Query 0 (more confident) covers the top half, query 1 the left half: query 1 has 512 pixels of its own
    # and wins 285: the bottom-left quarter (256) plus a 29-pixel sliver right of its edge where both
    # sigmoids are below 0.5 and query 0's is lower. Ratio 285/512 = 0.557: kept when >= threshold; when the
    # query is dropped, the pixels it won are void (detectron2: no re-assignment). A ratio equal to the
    # threshold keeps it (detectron2 drops when ratio < threshold; HF drops when not ratio > threshold).
    ml = square_logits(2)
    ml[0, 0, :4, :] = POS
    ml[0, 1, :, :4] = POS
    cl = class_logits_for([0, 1], num_classes=2, confidence=9.0)
    cl[0, 1, 1] = 6.0
    (res,) = panoptic_segmentation(
        cl, ml, [(32, 32)], [(32, 32)], thing_ids={0, 1}, overlap_mask_area_threshold=overlap
    )
    expected = torch.zeros(32, 32, dtype=torch.int32)
    expected[:16] = 1
    if kept:
        expected[16:, :16] = 2
    assert torch.equal(res.segmentation, expected)
    assert [(s.label_id, s.area) for s in res.segments] == ([(0, 512), (1, 256)] if kept else [(0, 512)])


def test_panoptic_mask_threshold_limits_segment_and_own_area():
    # One query, logits +0.5 in the top half (sigmoid 0.62) and -0.5 below (0.38): it wins every pixel but
    # only the top half is its segment. With mask_threshold 0.7 its own mask is empty: dropped.
    ml = torch.zeros(1, 1, 8, 8)
    ml[0, 0, :4] = 0.5
    ml[0, 0, 4:] = -0.5
    cl = class_logits_for([0], num_classes=1)
    (res,) = panoptic_segmentation(cl, ml, [(32, 32)], [(32, 32)], thing_ids={0}, overlap_mask_area_threshold=0.0)
    assert res.segmentation[:16].eq(1).all() and res.segmentation[16:].eq(0).all()
    assert res.segments[0].area == 512
    (res,) = panoptic_segmentation(cl, ml, [(32, 32)], [(32, 32)], thing_ids={0}, mask_threshold=0.7)
    assert res.segments == [] and not res.segmentation.any()


def test_panoptic_empty():
    # Every query predicts "no object": all void, no segments (HF: a -1 map).
    cl = class_logits_for([2, 2, 2], num_classes=2)
    ml = torch.full((1, 3, 8, 8), POS)
    (res,) = panoptic_segmentation(cl, ml, [(30, 20)], [(45, 30)], thing_ids={0})
    assert res.segments == []
    assert res.segmentation.shape == (45, 30) and res.segmentation.dtype == torch.int32
    assert not res.segmentation.any()


def test_padding_is_cropped_not_stretched():
    # The image fills (16, 24) of a (32, 32) padded input; the original is (32, 48) (non-square, x2). Query
    # 0 (thing, label 0) is positive on the whole image and negative on the padding, query 1 (label 1) the
    # other way round (weaker, so that it stays negative up to the image's corner). Cropped first, the image
    # is all query 0 / label 0; stretching the padded prediction to the original size (HF) would give the
    # bottom and right strips to query 1.
    ml = square_logits(2)
    ml[0, 0, :4, :6] = POS
    ml[0, 1] = -NEG
    ml[0, 1, :4, :6] = -POS
    cl = class_logits_for([0, 1], num_classes=2)
    resized, original = [(16, 24)], [(32, 48)]
    (sem,) = semantic_segmentation(cl, ml, resized, original)
    assert sem.shape == (32, 48) and not sem.any()
    (pan,) = panoptic_segmentation(cl, ml, resized, original, thing_ids={0})
    assert pan.segmentation.eq(1).all()
    assert [(s.label_id, s.area) for s in pan.segments] == [(0, 32 * 48)]
    (ins,) = instance_segmentation(cl, ml, resized, original, threshold=0.5)
    assert ins.labels.tolist() == [0] and ins.masks.shape == (1, 32, 48) and ins.masks.all()


def test_semantic_left_right_non_square():
    # Query 0 (label 2) on the left half, query 1 (label 0) on the right; image (16, 32) inside a (32, 32)
    # padded input (the halves continue into the padding: test_padding_is_cropped_not_stretched is about
    # the padding), original (24, 48). With symmetric logits the edge stays exactly in the middle through
    # both bilinear steps (x4, then x1.5).
    ml = square_logits(2)
    ml[0, 0, :, :4] = -NEG
    ml[0, 1, :, 4:] = -NEG
    cl = class_logits_for([2, 0], num_classes=3)
    (sem,) = semantic_segmentation(cl, ml, [(16, 32)], [(24, 48)])
    expected = torch.zeros(24, 48, dtype=torch.int64)
    expected[:, :24] = 2
    assert torch.equal(sem, expected)


def test_instance_scores_labels_and_order():
    # Query 0: logits +2 everywhere (mask = whole image, mean sigmoid = sigmoid(2)); classes 0 and 1 share
    # its probability, so it gives two instances with the same mask. Query 1: top-left quarter, label 2.
    ml = square_logits(2)
    ml[0, 0] = 2.0
    ml[0, 1, :4, :4] = POS
    cl = torch.tensor([[[3.0, 2.5, -9.0, -9.0], [-9.0, -9.0, 6.0, -9.0]]])
    (res,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)])
    probs = cl[0].softmax(-1)
    sig = torch.sigmoid(F.interpolate(ml, size=(32, 32), mode="bilinear", align_corners=False))[0]
    quarter = torch.zeros(32, 32, dtype=torch.bool)
    quarter[:16, :16] = True
    expected = sorted(
        [
            (probs[0, 0].item() * torch.sigmoid(torch.tensor(2.0)).item(), 0, torch.ones_like(quarter)),
            (probs[0, 1].item() * torch.sigmoid(torch.tensor(2.0)).item(), 1, torch.ones_like(quarter)),
            (probs[1, 2].item() * sig[1][quarter].mean().item(), 2, quarter),
        ],
        key=lambda t: -t[0],
    )
    assert isinstance(res, InstanceResult)
    # Every (query, class) pair with a non-empty mask has a positive score: 2 queries x 3 classes.
    assert len(res.scores) == 6
    assert res.masks.dtype == torch.bool and res.labels.dtype == torch.int64 and res.scores.dtype == torch.float32
    assert torch.all(res.scores[:-1] >= res.scores[1:])
    for j, (score, label, mask) in enumerate(expected):
        assert res.scores[j].item() == pytest.approx(score, rel=1e-5)
        assert res.labels[j].item() == label
        assert torch.equal(res.masks[j], mask)
    # Top-k is over class probabilities, before the mask score: (query 1, class 2) and (query 0, class 0).
    (top,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)], max_instances=2)
    assert top.labels.tolist() == [2, 0]
    (thr,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)], threshold=expected[1][0] - 1e-4)
    assert thr.labels.tolist() == [expected[0][1], expected[1][1]]


def test_instance_empty_cases():
    ml = square_logits(2)  # both masks empty: every score is 0
    cl = class_logits_for([0, 1], num_classes=2)
    (res,) = instance_segmentation(cl, ml, [(30, 20)], [(45, 30)])  # no threshold: kept at score 0 (official)
    assert res.masks.shape == (4, 45, 30) and not res.masks.any() and not res.scores.any()
    for kw in [{"threshold": 0.0}, {"threshold": 0.99}, {"max_instances": 0}]:
        (res,) = instance_segmentation(cl, ml, [(30, 20)], [(45, 30)], **kw)
        assert res.masks.shape == (0, 45, 30) and res.masks.dtype == torch.bool
        assert res.labels.shape == (0,) and res.scores.shape == (0,)
    ml[0, 0] = POS
    (res,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)], max_instances=1000)  # capped at Q*K
    assert len(res.scores) == 4 and res.scores[:2].all() and not res.scores[2:].any()
    (res,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)], threshold=0.0)
    assert len(res.scores) == 2  # query 0 with its two classes; query 1 has an empty mask


def test_instance_thing_filter_comes_after_the_top_k():
    # Query 0 is stuff (label 1) and most confident, query 1 a thing (label 0). With thing_ids the stuff pairs
    # are dropped after the top-k, as the official panoptic models do: the top 2 pairs hold one thing pair,
    # and the cut is not refilled from further down.
    ml = square_logits(2)
    ml[0, 0, :4] = POS
    ml[0, 1, 4:] = POS
    cl = torch.tensor([[[0.0, 9.0, -9.0], [6.0, 0.0, -9.0]]])  # (1, 2 queries, 2 classes + no object)
    (everything,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)], max_instances=2)
    assert sorted(everything.labels.tolist()) == [0, 1]
    (things,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)], max_instances=2, thing_ids={0})
    assert things.labels.tolist() == [0] and torch.equal(things.masks[0], everything.masks[everything.labels == 0][0])
    (things,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)], thing_ids={0})
    assert things.labels.tolist() == [0, 0]  # queries 1 and 0, both as class 0
    (none,) = instance_segmentation(cl, ml, [(32, 32)], [(32, 32)], thing_ids=set())
    assert len(none.scores) == 0


def test_semantic_at_input_size_is_the_official_order():
    # at_input_size: class scores combined at the input size, then resized (the official semantic-only
    # configs), written here from that definition. It equals the default order where the image is not
    # resized, and differs from it somewhere when the image is (the two are not the same function).
    cl, ml = random_logits(8, batch=1, queries=6, classes=5, size=24)  # padded input 96x96
    resized, original = (90, 72), (47, 131)
    (ours,) = semantic_segmentation(cl, ml, [resized], [original], at_input_size=True)
    padded = F.interpolate(ml, size=(96, 96), mode="bilinear", align_corners=False)[0, :, :90, :72].sigmoid()
    scores = torch.einsum("qc,qhw->chw", cl[0].softmax(-1)[:, :-1], padded)  # (K, 90, 72)
    official = F.interpolate(scores[None], size=original, mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(ours, official)
    (default,) = semantic_segmentation(cl, ml, [resized], [original])
    assert not torch.equal(default, official)
    (same_a,) = semantic_segmentation(cl, ml, [resized], [resized], at_input_size=True)
    (same_b,) = semantic_segmentation(cl, ml, [resized], [resized])
    assert torch.equal(same_a, same_b)


def test_batch_with_different_sizes_and_input_types():
    cl, ml = random_logits(5, batch=2, queries=6, classes=4, size=32)  # padded input 128x128
    resized = [(128, 96), (75, 128)]
    original = [(256, 192), (61, 104)]
    sem = semantic_segmentation(cl, ml, resized, original)
    ins = instance_segmentation(cl, ml, resized, original, threshold=0.2)
    pan = panoptic_segmentation(cl, ml, resized, original, thing_ids={0, 1}, threshold=0.3)
    for i, size in enumerate(original):
        assert sem[i].shape == size and ins[i].masks.shape[1:] == size and pan[i].segmentation.shape == size
        # Each image alone gives the same answer as in the batch.
        (alone,) = semantic_segmentation(cl[i : i + 1], ml[i : i + 1], [resized[i]], [size])
        assert torch.equal(alone, sem[i])
        areas = torch.bincount(pan[i].segmentation.flatten().long(), minlength=len(pan[i].segments) + 1)
        assert [s.area for s in pan[i].segments] == areas[1:].tolist()
        assert [s.id for s in pan[i].segments] == list(range(1, len(pan[i].segments) + 1))
    # numpy and float16 inputs (ONNX Runtime / TensorRT outputs) are accepted.
    from_numpy = semantic_segmentation(cl.numpy(), ml.numpy(), resized, original)
    assert all(torch.equal(a, b) for a, b in zip(from_numpy, sem))
    half = semantic_segmentation(cl.half(), ml.half(), resized, original)
    ref = semantic_segmentation(cl.half().float(), ml.half().float(), resized, original)
    assert all(torch.equal(a, b) for a, b in zip(half, ref))
    with pytest.raises(ValueError, match="batch of 2"):
        semantic_segmentation(cl, ml, resized[:1], original[:1])


def test_instance_masks_are_positive_logits_at_original_size():
    cl, ml = random_logits(7, batch=1, queries=5, classes=3, size=24)
    (res,) = instance_segmentation(cl, ml, [(90, 96)], [(45, 48)], max_instances=15)
    positives = masks_to_image(ml[0], (90, 96), (45, 48)) > 0  # (Q, H, W)
    assert len(res.masks) == 15
    for mask in res.masks:
        assert any(torch.equal(mask, p) for p in positives)
    assert np.all(np.diff(res.scores.numpy()) <= 0)
