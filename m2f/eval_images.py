"""Per-image comparisons for ``m2f eval`` reports (:mod:`m2f.eval_report`): what one backend's panoptic
output changed from another's, how one image scores against its ground truth, and the rankings built on them.

Two outputs' segments match when their IoU is over 0.5 (at most one partner each, since the segments of one
output do not overlap), whatever their labels: a matched pair with different labels is *relabelled*, an
unmatched segment of the first output is *lost*, one of the second *added*. Pixel disagreement is the fraction
of pixels whose class differs (void counts as a class of its own).
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from m2f import metrics

_OFFSET = 1 << 24  # segment ids of one image are < 2^24: a * _OFFSET + b identifies a pair


def class_map(ids: np.ndarray, segments: list[tuple[int, int]]) -> np.ndarray:
    """(H, W) segment ids + [(id, label)] -> (H, W) int64 labels, -1 where no segment is. Ids may be as large
    as COCO panoptic PNGs make them (up to 256^3): looked up by binary search, not a table that long."""
    ids = np.asarray(ids, np.int64)
    if not segments:
        return np.full(ids.shape, -1, np.int64)
    table = np.array(sorted(segments), np.int64)  # (N, 2) [id, label], by id
    pos = np.searchsorted(table[:, 0], ids).clip(0, len(table) - 1)  # (H, W)
    return np.where(table[pos, 0] == ids, table[pos, 1], -1)


def segment_changes(a, b, names: dict[int, str]) -> dict[str, Any]:
    """Two panoptic results of one image (``segmentation`` + ``segments``) -> what ``b`` changed from ``a``."""
    a_ids, b_ids = np.asarray(a.segmentation, np.int64), np.asarray(b.segmentation, np.int64)
    a_lab = {s.id: s.label_id for s in a.segments}
    b_lab = {s.id: s.label_id for s in b.segments}
    keys, counts = np.unique(a_ids.ravel() * _OFFSET + b_ids.ravel(), return_counts=True)
    pairs = list(zip((keys // _OFFSET).tolist(), (keys % _OFFSET).tolist(), counts.tolist()))
    area_a: dict[int, int] = {}
    area_b: dict[int, int] = {}
    for i, j, n in pairs:
        area_a[i] = area_a.get(i, 0) + n
        area_b[j] = area_b.get(j, 0) + n
    matched: dict[int, int] = {}
    for i, j, n in pairs:
        if i and j and n / (area_a[i] + area_b[j] - n) > 0.5:  # IoU > 0.5: at most one partner each
            matched[i] = j
    relabelled = [
        {"from": names[a_lab[i]], "to": names[b_lab[j]], "area": area_a[i]}
        for i, j in matched.items()
        if a_lab[i] != b_lab[j]
    ]
    partners = set(matched.values())
    lost = [{"label": names[a_lab[i]], "area": area_a[i]} for i in a_lab if i not in matched and i in area_a]
    added = [{"label": names[b_lab[j]], "area": area_b[j]} for j in b_lab if j not in partners and j in area_b]
    differ = class_map(a_ids, list(a_lab.items())) != class_map(b_ids, list(b_lab.items()))
    return {
        "pixel_disagreement": float(differ.mean()) if differ.size else 0.0,
        "added": len(added),
        "lost": len(lost),
        "relabelled": len(relabelled),
        "changes": {"added": added, "lost": lost, "relabelled": relabelled},
    }


def image_quality(task: str, scorer, gt, result, names: dict[int, str]) -> dict[str, Any] | None:
    """One image against its ground truth: PQ with its TP/FP/FN and the classes missed / invented (panoptic),
    or mIoU (semantic); None when the image has nothing to score."""
    if task == "panoptic":
        acc = metrics.PanopticQuality(scorer.categories)
        acc.update(
            gt[0], gt[1], result.segmentation, [{"id": s.id, "category_id": s.label_id} for s in result.segments]
        )
        m = acc.compute()
        if m["all"]["pq"] is None:
            return None
        per = m["per_class"].items()
        return {
            "pq": m["all"]["pq"],
            "tp": sum(c["tp"] for _, c in per),
            "fp": sum(c["fp"] for _, c in per),
            "fn": sum(c["fn"] for _, c in per),
            "missed": {names.get(k, str(k)): c["fn"] for k, c in per if c["fn"]},
            "invented": {names.get(k, str(k)): c["fp"] for k, c in per if c["fp"]},
        }
    acc = metrics.MeanIoU(len(names), ignore_index=255)
    acc.update(gt, result)
    m = acc.compute()
    return None if m["mIoU"] is None else {"miou": m["mIoU"], "pixel_accuracy": m["pixel_accuracy"]}


def disagreement_key(row: dict[str, Any]) -> tuple | None:
    """Larger = the backends disagree more on this image: changed segments, then changed pixels (the most of
    any backend); None when every backend gave the first one's classes everywhere."""
    d = row["disagreement"].values()
    segments = max((x["added"] + x["lost"] + x["relabelled"] for x in d), default=0)
    pixels = max((x["pixel_disagreement"] for x in d), default=0.0)
    return (segments, pixels, -row["index"]) if segments or pixels else None


def worst_key(row: dict[str, Any], label: str) -> tuple | None:
    """Larger = worse against the ground truth for ``label``; None when the image has no score."""
    q = row["quality"].get(label)
    if q is None:
        return None
    if "pq" in q:
        return (-q["pq"], q["fp"] + q["fn"], -row["index"])
    return (-q["miou"], 0, -row["index"])


class TopN:
    """The ``n`` largest keys seen (a min-heap): which images' pictures are worth keeping."""

    def __init__(self, n: int):
        self.n = n
        self.heap: list[tuple[tuple, int]] = []

    def push(self, key: tuple, image_id: int) -> int | None:
        """Add; returns the image id that dropped out (or the new one if it did not make it), else None."""
        if self.n <= 0:
            return image_id
        if len(self.heap) < self.n:
            heapq.heappush(self.heap, (key, image_id))
            return None
        return heapq.heappushpop(self.heap, (key, image_id))[1]

    def ids(self) -> set[int]:
        return {i for _, i in self.heap}
