"""The numpy post-processing against the torch module (the oracle), and its torch-free import.

Resized logits must agree to ``LOGIT_TOL``. Every decision must be the same, except where the torch value
lies within ``DECISION_TOL`` of its threshold (a logit vs 0, a sigmoid vs ``mask_threshold``, a class
probability vs ``threshold``, the top two of an argmax): float rounding may send it either way. Each test
asserts that every mismatch is of that kind and that such mismatches are rare; ``MISMATCHES`` counts them
(print it with ``-s``). The hand-made cases with known answers in ``tests/test_postprocess.py`` also run
through both modules.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_postprocess as tp
from test_postprocess import NEG, POS, class_logits_for, square_logits

from pipeline import postprocess as nq
from pipeline.postprocess import InstanceResult

REPO = Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-5
DECISION_TOL = 1e-4
MISMATCHES: Counter[str] = Counter()  # attributable mismatches found, by kind


@pytest.fixture(scope="module", autouse=True)
def report_mismatches():
    yield
    print(f"\nnumpy vs torch post-processing, attributable mismatches: {dict(MISMATCHES) or 'none'}")


def smooth_logits(seed: int, batch: int, queries: int, classes: int, size: tuple[int, int]):
    """(B, Q, K+1) class logits and (B, Q, h, w) mask logits, smooth as a model gives them.

    Each query's logit is about +4 on the coarse cells where it is the strongest and about -4 elsewhere
    (plus noise of std 2), so that masks overlap, as they do, but many keep most of their own area.
    """
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=g) * 3
    coarse = torch.randn(batch, queries, size[0] // 4 + 1, size[1] // 4 + 1, generator=g) * 2  # (B, Q, h', w')
    coarse = coarse + 8.0 * (coarse == coarse.max(1, keepdim=True).values) - 4.0
    mask_logits = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return class_logits, mask_logits


# (seed, queries, classes, mask logits (h, w), resized sizes, original sizes): padding, identity, upscaling,
# downscaling, odd sizes, 1-pixel-wide images and a batch of 3 different ones.
CASES = [
    (0, 10, 6, (24, 32), [(96, 120), (70, 128)], [(96, 120), (35, 64)]),
    (1, 12, 5, (20, 20), [(77, 61)], [(151, 119)]),
    (2, 8, 4, (16, 2), [(64, 1), (61, 5)], [(128, 1), (97, 1)]),
    (3, 9, 6, (17, 13), [(33, 17), (68, 52), (1, 1)], [(200, 3), (31, 29), (5, 7)]),
    (4, 16, 8, (32, 24), [(128, 96)], [(9, 7)]),
]
CASE_IDS = [f"case{c[0]}" for c in CASES]


def unpack(case):
    seed, queries, classes, size, resized, original = case
    cl, ml = smooth_logits(seed, len(resized), queries, classes, size)
    return cl, ml, resized, original


# ---------------------------------------------------------------------------------------------- imports
def test_does_not_import_torch():
    # torch made unimportable: any import of it fails, and the module still works.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from pipeline import postprocess as m\n"
        "cl = np.zeros((1, 2, 3), np.float32); ml = np.ones((1, 2, 4, 4), np.float32)\n"
        "assert m.semantic_segmentation(cl, ml, [(16, 16)], [(8, 8)])[0].shape == (8, 8)\n"
        "assert m.instance_segmentation(cl, ml, [(16, 16)], [(8, 8)])[0].masks.shape == (4, 8, 8)\n"
        "assert m.panoptic_segmentation(cl, ml, [(16, 16)], [(8, 8)], {0}, threshold=0.1)[0].segments\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_result_types_are_shared():
    assert tp.Segment is nq.Segment and tp.InstanceResult is nq.InstanceResult
    assert tp.PanopticResult is nq.PanopticResult and tp.MASK_STRIDE == nq.MASK_STRIDE == 4


# ---------------------------------------------------------------------------------------------- resize
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_masks_to_image_matches_torch(case):
    _, ml, resized, original = unpack(case)
    for i in range(len(resized)):
        ours = nq.masks_to_image(ml[i].numpy(), resized[i], original[i])
        ref = tp.masks_to_image(ml[i], resized[i], original[i]).numpy()
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (ml.shape[1], *original[i])
        np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_TOL)


def test_masks_to_image_large_resizes_match_torch():
    # COCO-like sizes: 480x640 and 1000x1333 originals resized to shortest edge 800 (both matrix orders).
    g = np.random.default_rng(0)
    for logits, resized, original in [((200, 272), (800, 1066), (480, 640)), ((200, 336), (800, 1333), (1000, 1333))]:
        ml = (g.standard_normal((2, *logits)) * 8).astype(np.float32)
        ours = nq.masks_to_image(ml, resized, original)
        ref = tp.masks_to_image(torch.from_numpy(ml), resized, original).numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_TOL)


def test_masks_to_image_edge_cases():
    ml = np.random.default_rng(1).standard_normal((3, 10, 12)).astype(np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        nq.masks_to_image(ml, (41, 48), (41, 48))
    with pytest.raises(ValueError, match="positive"):
        nq.masks_to_image(ml, (40, 48), (0, 48))
    assert nq.masks_to_image(ml[:0], (40, 48), (7, 9)).shape == (0, 7, 9)
    # float16 / float64 inputs are computed in float32.
    for dtype in (np.float16, np.float64):
        ours = nq.masks_to_image(ml.astype(dtype), (37, 45), (50, 61))
        ref = nq.masks_to_image(ml.astype(dtype).astype(np.float32), (37, 45), (50, 61))
        assert ours.dtype == np.float32 and np.array_equal(ours, ref)
    # Non-finite logits are clipped: the result stays finite where torch gives inf or NaN, with torch's signs.
    x = np.full((2, 6, 5), -3.0, dtype=np.float32)
    x[0, 2, 2], x[1, 1, 1], x[1, 4, 4] = np.inf, -np.inf, np.nan
    ours = nq.masks_to_image(x, (20, 17), (13, 29))
    ref = tp.masks_to_image(torch.from_numpy(x), (20, 17), (13, 29)).numpy()
    assert np.isfinite(ours).all()
    finite = ~np.isnan(ref)
    assert np.array_equal(ours[finite] > 0, ref[finite] > 0)


# ---------------------------------------------------------------------------------------------- oracle helpers
def torch_probs(ml: torch.Tensor, resized, original) -> torch.Tensor:
    return tp.masks_to_image(ml, resized, original).sigmoid()  # (Q, H, W)


def near(values: torch.Tensor | np.ndarray, threshold: float) -> np.ndarray:
    return np.abs(np.asarray(values, dtype=np.float64) - threshold) < DECISION_TOL


def torch_semantic_scores(cl_i, ml_i, resized, original, at_input_size: bool) -> np.ndarray:
    """The oracle's (K, H, W) class scores of one image, in the order ``at_input_size`` says."""
    cls = cl_i.softmax(-1)[:, :-1]  # (Q, K)
    if not at_input_size:
        return torch.einsum("qk,qhw->khw", cls, torch_probs(ml_i, resized, original)).numpy()
    scores = torch.einsum("qk,qhw->khw", cls, torch_probs(ml_i, resized, resized))  # (K, h, w)
    return F.interpolate(scores[None], size=tuple(original), mode="bilinear", align_corners=False)[0].numpy()


def compare_semantic(cl, ml, resized, original, counter: Counter[str] = MISMATCHES, at_input_size=False) -> None:
    ours = nq.semantic_segmentation(cl.numpy(), ml.numpy(), resized, original, at_input_size=at_input_size)
    ref = tp.semantic_segmentation(cl, ml, resized, original, at_input_size=at_input_size)
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.dtype == np.int64 and o.shape == tuple(r.shape) == tuple(original[i])
        diff = np.argwhere(o != r.numpy())  # (n, 2)
        if len(diff):
            # Attributable: torch's score of our class is within DECISION_TOL of its best.
            scores = torch_semantic_scores(cl[i], ml[i], resized[i], original[i], at_input_size)
            ys, xs = diff[:, 0], diff[:, 1]
            gap = scores[r.numpy()[ys, xs], ys, xs] - scores[o[ys, xs], ys, xs]
            assert np.all(gap < DECISION_TOL), gap.max()
            assert len(diff) <= max(2, 1e-3 * o.size)
            counter["semantic argmax"] += len(diff)


def query_of(mask: np.ndarray, fg: np.ndarray) -> int:
    """The first query whose foreground (Q, H, W) equals ``mask``."""
    return int(np.flatnonzero((fg == mask).reshape(len(fg), -1).all(1))[0])


def compare_instance(cl, ml, resized, original, counter: Counter[str] = MISMATCHES, **kw) -> None:
    threshold = kw.get("threshold")
    ours = nq.instance_segmentation(cl.numpy(), ml.numpy(), resized, original, **kw)
    ref = tp.instance_segmentation(cl, ml, resized, original, **kw)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.masks.dtype == bool and o.labels.dtype == np.int64 and o.scores.dtype == np.float32
        assert o.masks.shape[1:] == tuple(original[i])
        assert np.all(np.diff(o.scores) <= 0)
        if "thing_ids" in kw:
            assert set(o.labels.tolist()) <= set(kw["thing_ids"])
        if threshold is None:  # no score threshold: the same pairs, scores of 0 (empty masks) included
            assert len(o.scores) == len(r.scores)
            threshold = 0.0  # below: results scored near 0 are compared as for a threshold of 0
        # Results scored within DECISION_TOL of the threshold may be in one list only.
        o_keep, r_keep = ~near(o.scores, threshold), ~near(r.scores, threshold)
        if o_keep.sum() != r_keep.sum():
            counter["instance score vs threshold"] += abs(int(o_keep.sum()) - int(r_keep.sum()))
        o_masks, o_labels, o_scores = o.masks[o_keep], o.labels[o_keep], o.scores[o_keep]
        r_masks, r_labels, r_scores = r.masks.numpy()[r_keep], r.labels.numpy()[r_keep], r.scores.numpy()[r_keep]
        assert np.array_equal(o_labels, r_labels)
        flipped = (o_masks != r_masks).reshape(len(o_masks), -1).sum(1)  # (N,) mask pixels that differ
        if flipped.any():
            logits = tp.masks_to_image(ml[i], resized[i], original[i]).numpy()  # (Q, H, W)
            fg = logits > 0
            for om, rm in zip(o_masks, r_masks):
                diff = om != rm
                if diff.any():  # attributable: torch's logit is within DECISION_TOL of 0
                    assert np.all(np.abs(logits[query_of(rm, fg)][diff]) < DECISION_TOL)
                    counter["instance logit vs 0"] += int(diff.sum())
        # A pixel in or out moves the mean sigmoid in the mask by at most 1 / area.
        area = r_masks.reshape(len(r_masks), -1).sum(1)
        slack = flipped / np.maximum(area - flipped, 1)
        assert np.all(np.abs(o_scores - r_scores) <= 1e-5 * r_scores + 1e-7 + slack)


def compare_panoptic(cl, ml, resized, original, thing_ids, counter: Counter[str] = MISMATCHES, **kw) -> None:
    threshold = kw.get("threshold", 0.8)
    mask_threshold = kw.get("mask_threshold", 0.5)
    ours = nq.panoptic_segmentation(cl.numpy(), ml.numpy(), resized, original, thing_ids, **kw)
    ref = tp.panoptic_segmentation(cl, ml, resized, original, thing_ids, **kw)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.segmentation.dtype == np.int32 and o.segmentation.shape == tuple(original[i])
        scores, labels = cl[i].softmax(-1).max(-1)
        candidates = labels != cl.shape[-1] - 1
        if near(scores[candidates], threshold).any() and [s[:2] for s in o.segments] != [s[:2] for s in r.segments]:
            counter["panoptic class probability vs threshold"] += 1  # a query in or out: all else may differ
            continue
        assert [(s.id, s.label_id, s.isthing) for s in o.segments] == [
            (s.id, s.label_id, s.isthing) for s in r.segments
        ]
        assert all(isinstance(s.score, float) and isinstance(s.area, int) for s in o.segments)
        assert np.allclose([s.score for s in o.segments], [s.score for s in r.segments], rtol=1e-6, atol=0)
        areas = np.bincount(o.segmentation.reshape(-1), minlength=len(o.segments) + 1)
        assert [s.area for s in o.segments] == areas[1:].tolist()
        diff = np.argwhere(o.segmentation != r.segmentation.numpy())  # (n, 2)
        if len(diff):
            # Attributable: torch's top two score * sigmoid are within DECISION_TOL, or the winner's sigmoid
            # is within DECISION_TOL of mask_threshold.
            kept = (candidates & (scores > threshold)).nonzero().flatten()
            probs = torch_probs(ml[i, kept], resized[i], original[i])  # (M, H, W)
            ys, xs = diff[:, 0], diff[:, 1]
            weighted = (probs * scores[kept][:, None, None]).numpy()[:, ys, xs]  # (M, n)
            if len(kept) > 1:
                top2 = np.sort(weighted, axis=0)[-2:]  # (2, n)
                argmax_tie = top2[1] - top2[0] < DECISION_TOL
            else:
                argmax_tie = np.zeros(len(diff), dtype=bool)
            winner_prob = probs.numpy()[weighted.argmax(0), ys, xs]
            assert np.all(argmax_tie | near(winner_prob, mask_threshold))
            assert len(diff) <= max(2, 1e-3 * o.segmentation.size)
            counter["panoptic argmax"] += int(argmax_tie.sum())
            counter["panoptic sigmoid vs mask_threshold"] += int((~argmax_tie).sum())


# ---------------------------------------------------------------------------------------------- tasks
# Each task runs with the default strips (one strip for these sizes) and with strips of a few columns
# (STRIP_BYTES of 1 byte: one column each; 4096: a few), so the strip boundaries are crossed everywhere.
STRIPS = [None, 1, 4096]
STRIP_IDS = ["strips-default", "strips-1col", "strips-4k"]


@pytest.fixture(params=STRIPS, ids=STRIP_IDS)
def strips(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(nq, "STRIP_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("at_input_size", [False, True], ids=["masks-resized", "scores-resized"])
def test_semantic_matches_torch(case, at_input_size, strips):
    compare_semantic(*unpack(case), at_input_size=at_input_size)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"threshold": 0.0},
        {"threshold": 0.2, "max_instances": 7},
        {"max_instances": 1000},
        {"thing_ids": {0, 2}, "max_instances": 30},
    ],
)
def test_instance_matches_torch(case, kw, strips):
    compare_instance(*unpack(case), **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"threshold": 0.3},
        {"threshold": 0.2, "mask_threshold": 0.3, "overlap_mask_area_threshold": 0.5},
        {"threshold": 0.0, "mask_threshold": 0.0, "overlap_mask_area_threshold": 0.1},
    ],
)
def test_panoptic_matches_torch(case, kw, strips):
    cl, ml, resized, original = unpack(case)
    num_classes = cl.shape[-1] - 1
    compare_panoptic(cl, ml, resized, original, set(range(num_classes // 2)), **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_strips_equal_one_resize(case):
    """Column strips of any width give the logits of one whole-image resize (to float rounding)."""
    _, ml, resized, original = unpack(case)
    for i in range(len(resized)):
        x = ml[i].numpy()
        whole = nq.masks_to_image(x, resized[i], original[i])  # (Q, H, W)
        for max_bytes in (1, 4096, 1 << 16):
            parts = [(c0, c1, out.copy()) for c0, c1, out in nq.logit_strips(x, resized[i], original[i], max_bytes)]
            assert [p[0] for p in parts] == sorted({p[0] for p in parts}) and parts[-1][1] == whole.shape[2]
            assert all(p[2].nbytes <= max(max_bytes, p[2].shape[0] * p[2].shape[1] * 4) for p in parts)
            joined = np.concatenate([p[2] for p in parts], axis=2)
            np.testing.assert_allclose(joined, whole, rtol=0, atol=LOGIT_TOL)
            columns = [out.copy() for _, _, out in nq.logit_strips(x, resized[i], original[i], max_bytes, True)]
            joined = np.concatenate(columns, axis=1)  # (Q, W, H): column-major strips
            np.testing.assert_allclose(joined.transpose(0, 2, 1), whole, rtol=0, atol=LOGIT_TOL)


def test_some_panoptic_cases_have_segments_and_merged_stuff():
    # The parity cases above are not vacuous: segments, several ids, and a stuff merge.
    cl, ml, resized, original = unpack(CASES[0])
    res = nq.panoptic_segmentation(cl.numpy(), ml.numpy(), resized, original, {0, 1, 2}, threshold=0.3)[0]
    segment_queries = sum(s.area > 0 for s in res.segments)
    assert segment_queries >= 3
    scores, labels = cl[0].softmax(-1).max(-1)
    stuff = [int(lab) for lab, score in zip(labels, scores) if score > 0.3 and 3 <= lab < cl.shape[-1] - 1]
    assert max(Counter(stuff).values()) > 1  # at least two queries of one stuff label take part


def test_comparisons_attribute_rounding_noise(monkeypatch):
    # The comparisons above find few or no mismatches, so check that they do their job: with noise of up to
    # 5e-5 added to our resized logits (below DECISION_TOL), they must find mismatches and attribute every
    # one. Query 1 is query 0 (logit 2) with a tilted mask and another class: their scores tie along a
    # slanted line (semantic, panoptic argmax), along which query 1's logit is 2; its logit crosses 2.2
    # (sigmoid 0.9) along another; query 2's logit crosses 0 along a third (instance).
    strips = nq.logit_strips
    rng = np.random.default_rng(0)
    noise = 5e-5

    def noisy(*args, **kwargs):
        for c0, c1, out in strips(*args, **kwargs):
            yield c0, c1, out + rng.uniform(-noise, noise, out.shape).astype(np.float32)

    monkeypatch.setattr(nq, "logit_strips", noisy)
    cl, ml, resized, _ = unpack(CASES[1])
    cl[0, 0, 0] = 8.0
    cl[0, 1] = cl[0, 0, [1, 0, 2, 3, 4, 5]]
    cl[0, 2:, :2] = -10.0  # classes 0 and 1 come from queries 0 and 1 only
    h, w = ml.shape[-2:]
    tilted = torch.linspace(-1.0, 1.0, w) + torch.linspace(-0.3, 0.3, h)[:, None]  # (h, w)
    ml[0, 3:] -= 6.0  # the other queries are weak: they win no pixel
    ml[0, 0] = 2.0
    ml[0, 1] = 2.0 + tilted
    ml[0, 2] = tilted
    original = [(600, 480)]  # enough pixels close to a threshold
    found: Counter[str] = Counter()
    compare_semantic(cl, ml, resized, original, counter=found)
    compare_instance(cl, ml, resized, original, counter=found)
    kw = dict(threshold=0.3, overlap_mask_area_threshold=0.2)
    compare_panoptic(cl, ml, resized, original, {0, 1}, counter=found, **kw)
    compare_panoptic(cl, ml, resized, original, {0, 1}, counter=found, mask_threshold=0.9, **kw)
    kinds = ["semantic argmax", "instance logit vs 0", "panoptic argmax", "panoptic sigmoid vs mask_threshold"]
    assert all(found[k] for k in kinds), found
    # Noise well above DECISION_TOL gives mismatches that are not attributable: the comparisons fail.
    noise = 1e-2
    for compare in (compare_semantic, compare_instance):
        with pytest.raises(AssertionError):
            compare(cl, ml, resized, original, counter=Counter())
    with pytest.raises(AssertionError):
        compare_panoptic(cl, ml, resized, original, {0, 1}, counter=Counter(), **kw)


# ---------------------------------------------------------------------------------------------- hand-made
def canonical(res: InstanceResult) -> InstanceResult:
    """Equal scores in a fixed order (by label, then mask): torch's topk leaves the order of ties open."""
    order = sorted(range(len(res.scores)), key=lambda j: (-res.scores[j], res.labels[j], res.masks[j].tobytes()))
    return InstanceResult(res.masks[order], res.labels[order], res.scores[order])


def merge_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Queries 0, 1: stuff label 1 in two corners; queries 2, 3: thing label 0 in the others; equal scores."""
    ml = square_logits(4)
    ml[0, 0, :4, :4] = POS
    ml[0, 1, 4:, 4:] = POS
    ml[0, 2, :4, 4:] = POS
    ml[0, 3, 4:, :4] = POS
    return class_logits_for([1, 1, 0, 0], num_classes=2), ml


def test_instance_ties_keep_query_order():
    # Four queries with the same class probability and equal-area masks: the top-k cut and the final order
    # keep the lower query * K + class index first (torch's topk leaves this open).
    cl, ml = merge_case()
    (res,) = nq.instance_segmentation(cl.numpy(), ml.numpy(), [(32, 32)], [(32, 32)], max_instances=3)
    assert res.labels.tolist() == [1, 1, 0]
    assert res.scores[0] == res.scores[1] == res.scores[2]
    assert res.masks[0, :16, :16].all() and res.masks[1, 16:, 16:].all() and res.masks[2, :16, 16:].all()
    assert res.masks.sum() == 3 * 256


def test_hand_made_cases_match_torch():
    # The inputs of tests/test_postprocess.py's hand-made cases (exact square edges, ties between the classes
    # of one query, equal masks, stuff merges, empty results) give identical results.
    merge = merge_case()
    ml = square_logits(2)
    ml[0, 0, :4, :] = POS
    ml[0, 1, :, :4] = POS
    cl = class_logits_for([0, 1], num_classes=2, confidence=9.0)
    cl[0, 1, 1] = 6.0
    overlap = (cl, ml)
    ml = square_logits(2)
    ml[0, 0] = 2.0
    ml[0, 1, :4, :4] = POS
    two_classes = (torch.tensor([[[3.0, 2.5, -9.0, -9.0], [-9.0, -9.0, 6.0, -9.0]]]), ml)
    ml = square_logits(2)
    ml[0, 0, :4, :6] = POS
    ml[0, 1] = -NEG
    ml[0, 1, :4, :6] = -POS
    padded = (class_logits_for([0, 1], num_classes=2), ml)
    empty = (class_logits_for([2, 2, 2], num_classes=2), torch.full((1, 3, 8, 8), POS))
    for cl, ml in [merge, overlap, two_classes, padded, empty]:
        for resized, original in [((32, 32), (32, 32)), ((16, 24), (32, 48)), ((30, 20), (45, 30))]:
            args = (cl.numpy(), ml.numpy(), [resized], [original])
            targs = (cl, ml, [resized], [original])
            assert np.array_equal(nq.semantic_segmentation(*args)[0], tp.semantic_segmentation(*targs)[0].numpy())
            for kw in [{}, {"threshold": 0.5}, {"max_instances": 0}]:  # no top-k cut through equal probabilities
                (o,), (r,) = nq.instance_segmentation(*args, **kw), tp.instance_segmentation(*targs, **kw)
                o, r = canonical(o), canonical(InstanceResult(*(t.numpy() for t in r)))
                assert np.array_equal(o.masks, r.masks) and np.array_equal(o.labels, r.labels)
                np.testing.assert_allclose(o.scores, r.scores, rtol=1e-6)
            for kw in [{}, {"overlap_mask_area_threshold": 0.5}, {"mask_threshold": 0.7}]:
                (o,), (r,) = nq.panoptic_segmentation(*args, {0}, **kw), tp.panoptic_segmentation(*targs, {0}, **kw)
                assert np.array_equal(o.segmentation, r.segmentation.numpy())
                assert [s._replace(score=0.0) for s in o.segments] == [s._replace(score=0.0) for s in r.segments]
                assert np.allclose([s.score for s in o.segments], [s.score for s in r.segments], rtol=1e-6)


def test_batch_checks_and_input_types():
    cl, ml, resized, original = unpack(CASES[0])
    cl, ml = cl.numpy(), ml.numpy()
    with pytest.raises(ValueError, match="batch of 2"):
        nq.semantic_segmentation(cl, ml, resized[:1], original[:1])
    with pytest.raises(ValueError, match="disagree"):
        nq.instance_segmentation(cl, ml[:, :3], resized, original)
    with pytest.raises(ValueError, match="expected"):
        nq.panoptic_segmentation(cl[0], ml, resized, original, {0})
    # float16 (TensorRT) outputs are computed in float32; lists are accepted.
    half = nq.semantic_segmentation(cl.astype(np.float16), ml.astype(np.float16), resized, original)
    ref = nq.semantic_segmentation(
        cl.astype(np.float16).astype(np.float32), ml.astype(np.float16).tolist(), resized, original
    )
    assert all(np.array_equal(a, b) for a, b in zip(half, ref))
