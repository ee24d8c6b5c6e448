"""Segmentation metrics: panoptic quality (PQ/SQ/RQ), COCO mask AP, and mIoU. numpy (+ pycocotools), no torch.

Conventions (all scores are percentages, 0..100; ``None`` where a mean has nothing to average):

- **PQ** follows panopticapi's ``pq_compute`` (the COCO panoptic protocol): within one image a ground-truth
  (GT) and a predicted segment of the same category match when IoU > 0.5, where the union leaves out the
  predicted pixels that fall on GT void (id 0); GT crowd segments (``iscrowd`` = 1) never match; an
  unmatched prediction is not a false positive when more than half of its pixels lie on GT void or on a
  GT crowd segment of its own category. TP/FP/FN and the matched IoUs are summed per category over the
  whole dataset, then PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP), RQ = TP / (TP +
  FP/2 + FN/2) per category; "all"/"things"/"stuff" are the unweighted means over the categories of
  that split with TP + FP + FN > 0 (they occur, non-crowd, in the GT or in the predictions), exactly as
  panopticapi's ``pq_average``. Two details differ from panopticapi and only matter on inconsistent
  data: segment areas always come from the id maps (panopticapi takes GT areas from the JSON), and every
  unmatched crowd segment of a category counts for the FP rule (panopticapi keeps the last one per
  category; COCO has at most one per category and image). A split or class with no segment on either side
  gets ``None`` (panopticapi divides by zero for an empty split and prints 0.0 for such a class).
- **Mask AP** is pycocotools' ``COCOeval`` with ``iouType="segm"`` and its default parameters (IoU 0.50:0.95,
  100 detections per image, areas small < 32^2 <= medium < 96^2 <= large). pycocotools' -1 ("no GT in that
  range") becomes ``None``.
- **mIoU** is the detectron2 ``SemSegEvaluator`` convention: one confusion matrix over the dataset,
  IoU_c = TP / (TP + FP + FN), averaged over the classes that occur in the GT or in the predictions (union
  > 0); GT pixels equal to ``ignore_index`` are left out (with whatever was predicted there). Pixel
  accuracy is correct / valid GT pixels; mean accuracy averages TP / GT pixels over classes in the GT.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

VOID = 0  # the id of void pixels in a panoptic id map
_OFFSET = 1 << 24  # ids of a COCO panoptic PNG are < 256^3; gt * _OFFSET + pred fits in int64

Segments = Sequence[Mapping[str, Any]]  # [{"id", "category_id", "iscrowd"?}, ...]
PanopticImage = tuple[np.ndarray, Segments]  # (id map (H, W), segments_info)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * float(x)


# ---------------------------------------------------------------------------------------------- panoptic
class PanopticQuality:
    """Accumulates PQ statistics image by image (so a dataset never has to be in memory at once).

    Args:
        categories: the dataset's categories, COCO style: dicts with ``id``, ``isthing`` (0/1) and
            optionally ``name``. Only these categories are scored; a segment of another category is an error.

    Call :meth:`update` once per image, then :meth:`compute`.
    """

    def __init__(self, categories: Iterable[Mapping[str, Any]]):
        self.categories = {int(c["id"]): c for c in categories}
        if not self.categories:
            raise ValueError("panoptic quality needs at least one category")
        k = len(self.categories)
        self._index = {cid: i for i, cid in enumerate(self.categories)}
        self.tp = np.zeros(k, dtype=np.int64)
        self.fp = np.zeros(k, dtype=np.int64)
        self.fn = np.zeros(k, dtype=np.int64)
        self.iou = np.zeros(k, dtype=np.float64)
        self.num_images = 0

    def _segment_table(self, segments: Segments, side: str) -> dict[int, tuple[int, bool]]:
        """{segment id: (category index, iscrowd)}, validated."""
        table: dict[int, tuple[int, bool]] = {}
        for s in segments:
            sid, cat = int(s["id"]), int(s["category_id"])
            if sid == VOID:
                raise ValueError(f"{side} segment id 0 is reserved for void")
            if sid in table:
                raise ValueError(f"{side} segment id {sid} appears twice in one image")
            if cat not in self._index:
                raise ValueError(f"{side} segment {sid} has category {cat}, which is not among the categories")
            table[sid] = (self._index[cat], bool(s.get("iscrowd", 0)))
        return table

    def update(self, gt_map: np.ndarray, gt_segments: Segments, pred_map: np.ndarray, pred_segments: Segments) -> None:
        """Add one image: GT and predicted (H, W) id maps (0 = void) and their segments_info."""
        gt_map, pred_map = np.asarray(gt_map), np.asarray(pred_map)
        if gt_map.shape != pred_map.shape or gt_map.ndim != 2:
            raise ValueError(
                f"GT and predicted id maps must be (H, W) of one size, got {gt_map.shape} and {pred_map.shape}"
            )
        gt = self._segment_table(gt_segments, "GT")
        pred = self._segment_table(pred_segments, "predicted")

        # Pixel counts of every (GT id, predicted id) pair that overlaps.
        keys = gt_map.astype(np.int64).ravel() * _OFFSET + pred_map.astype(np.int64).ravel()
        pair_keys, pair_counts = np.unique(keys, return_counts=True)
        gt_ids, pred_ids = (pair_keys // _OFFSET).tolist(), (pair_keys % _OFFSET).tolist()
        pairs = dict(zip(zip(gt_ids, pred_ids), pair_counts.tolist()))

        gt_area: dict[int, int] = dict.fromkeys(gt, 0)
        pred_area: dict[int, int] = dict.fromkeys(pred, 0)
        for (g, p), n in pairs.items():
            if g != VOID:
                if g not in gt:
                    raise ValueError(f"GT id map has segment id {g}, which is not in its segments_info")
                gt_area[g] += n
            if p != VOID:
                if p not in pred:
                    raise ValueError(f"predicted id map has segment id {p}, which is not in its segments_info")
                pred_area[p] += n
        empty = [p for p, a in pred_area.items() if a == 0]
        if empty:
            raise ValueError(f"predicted segment(s) {empty} are in segments_info but have no pixels")

        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for (g, p), inter in pairs.items():
            if g == VOID or p == VOID:
                continue
            (g_cat, g_crowd), (p_cat, _) = gt[g], pred[p]
            if g_crowd or g_cat != p_cat:
                continue
            union = pred_area[p] + gt_area[g] - inter - pairs.get((VOID, p), 0)
            iou = inter / union
            if iou > 0.5:  # at most one partner each: two IoUs > 0.5 would need overlapping segments
                self.tp[g_cat] += 1
                self.iou[g_cat] += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd: dict[int, list[int]] = {}  # category index -> its unmatched crowd segment ids
        for g, (cat, is_crowd) in gt.items():
            if g in gt_matched:
                continue
            if is_crowd:
                crowd.setdefault(cat, []).append(g)
            else:
                self.fn[cat] += 1
        for p, (cat, _) in pred.items():
            if p in pred_matched:
                continue
            ignored = pairs.get((VOID, p), 0) + sum(pairs.get((g, p), 0) for g in crowd.get(cat, ()))
            if ignored / pred_area[p] > 0.5:
                continue
            self.fp[cat] += 1
        self.num_images += 1

    def compute(self) -> dict[str, Any]:
        """PQ/SQ/RQ (0..100) for "all", "things", "stuff" (with ``n``, the categories averaged) and per class.

        ``per_class`` maps each category id to its ``pq``, ``sq``, ``rq`` (``None`` when the category has
        no segment on either side), ``tp``, ``fp``, ``fn`` and ``name``.
        """
        tp, fp, fn, iou = self.tp.astype(np.float64), self.fp, self.fn, self.iou
        denom = tp + 0.5 * fp + 0.5 * fn
        present = (self.tp + self.fp + self.fn) > 0
        safe = np.where(present, denom, 1.0)
        pq = np.where(present, iou / safe, 0.0)
        rq = np.where(present, tp / safe, 0.0)
        sq = np.where(self.tp > 0, iou / np.maximum(tp, 1.0), 0.0)
        isthing = np.array([bool(c.get("isthing", 0)) for c in self.categories.values()])

        result: dict[str, Any] = {}
        for split, select in (("all", np.ones_like(isthing)), ("things", isthing), ("stuff", ~isthing)):
            m = select & present
            n = int(m.sum())
            result[split] = {
                "pq": _pct(pq[m].mean()) if n else None,
                "sq": _pct(sq[m].mean()) if n else None,
                "rq": _pct(rq[m].mean()) if n else None,
                "n": n,
            }
        result["per_class"] = {
            cid: {
                "name": c.get("name", str(cid)),
                "isthing": bool(isthing[i]),
                "pq": _pct(pq[i]) if present[i] else None,
                "sq": _pct(sq[i]) if present[i] else None,
                "rq": _pct(rq[i]) if present[i] else None,
                "tp": int(self.tp[i]),
                "fp": int(self.fp[i]),
                "fn": int(self.fn[i]),
            }
            for i, (cid, c) in enumerate(self.categories.items())
        }
        result["num_images"] = self.num_images
        return result


def panoptic_quality(
    gt: Iterable[PanopticImage], pred: Iterable[PanopticImage], categories: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """Panoptic quality over a dataset, COCO panoptic rules (see the module docstring).

    Args:
        gt: per image, ``(id_map, segments_info)``: an (H, W) integer map of segment ids (0 = void) and the
            segments as dicts with ``id``, ``category_id`` and ``iscrowd`` (default 0).
        pred: the predictions, in the same form and image order (``iscrowd`` is ignored).
        categories: COCO category dicts with ``id`` and ``isthing`` (and optionally ``name``).

    Returns:
        ``{"all" | "things" | "stuff": {"pq", "sq", "rq", "n"}, "per_class": {id: {...}}, "num_images"}``,
        scores in 0..100; see :meth:`PanopticQuality.compute`.
    """
    acc = PanopticQuality(categories)
    for (gt_map, gt_segments), (pred_map, pred_segments) in zip(gt, pred, strict=True):  # lengths must agree
        acc.update(gt_map, gt_segments, pred_map, pred_segments)
    return acc.compute()


# ---------------------------------------------------------------------------------------------- mask AP
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_from(instances: str | Path | Mapping[str, Any]):
    if isinstance(instances, (str, Path)):
        dataset = json.loads(Path(instances).read_text())
    else:
        dataset = copy.deepcopy(dict(instances))
    dataset.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def mask_ap(
    instances: str | Path | Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """COCO mask AP with pycocotools (``COCOeval``, ``iouType="segm"``, default parameters).

    Args:
        instances: the GT, a COCO instances JSON path or its dict (RLE or polygon segmentations).
        predictions: COCO results: ``{"image_id", "category_id", "segmentation" (RLE), "score"}``. Predictions
            of categories that are not in the GT are not scored (as in ``COCOeval``).
        image_ids: evaluate these images only (default: every GT image).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in 0..100 (``None`` where the GT has no instance
        to score), plus ``num_images`` and ``num_predictions``. No predictions give AP 0.
    """
    gt = _coco_from(instances)
    img_ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    missing = set(img_ids) - set(gt.getImgIds())
    if missing:
        raise ValueError(f"image ids {sorted(missing)[:10]} are not in the GT")
    wanted = set(img_ids)
    preds = [copy.deepcopy(dict(p)) for p in predictions if int(p["image_id"]) in wanted]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        if preds:
            dt = gt.loadRes(preds)
        else:  # loadRes fails on an empty list; an empty result set scores 0 where there is GT
            dt = COCO()
            dt.dataset = {"images": gt.dataset.get("images", []), "categories": gt.dataset.get("categories", [])}
            dt.dataset["annotations"] = []
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats[: len(AP_NAMES)]
    result: dict[str, Any] = {name: (None if s < 0 else 100.0 * float(s)) for name, s in zip(AP_NAMES, stats)}
    result["num_images"] = len(img_ids)
    result["num_predictions"] = len(preds)
    return result


# ---------------------------------------------------------------------------------------------- mIoU
class MeanIoU:
    """Accumulates a (num_classes, num_classes) confusion matrix (rows GT, columns prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, gt_map: np.ndarray, pred_map: np.ndarray) -> None:
        """Add one image: (H, W) GT and predicted class maps."""
        gt_map, pred_map = np.asarray(gt_map), np.asarray(pred_map)
        if gt_map.shape != pred_map.shape:
            raise ValueError(f"GT {gt_map.shape} and prediction {pred_map.shape} differ in size")
        valid = gt_map != self.ignore_index
        g = gt_map[valid].astype(np.int64)
        p = pred_map[valid].astype(np.int64)
        k = self.num_classes
        if g.size and (g.min() < 0 or g.max() >= k):
            raise ValueError(f"GT class ids must be in 0..{k - 1} or {self.ignore_index}")
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"predicted class ids must be in 0..{k - 1}")
        self.confusion += np.bincount(g * k + p, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, Any]:
        """``mIoU``, ``pixel_accuracy``, ``mean_accuracy`` (0..100), ``n`` (classes averaged), ``per_class`` IoU."""
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        gt_count, pred_count = cm.sum(1), cm.sum(0)
        union = gt_count + pred_count - tp
        present = union > 0
        iou = np.where(present, tp / np.where(present, union, 1.0), 0.0)
        in_gt = gt_count > 0
        acc = np.where(in_gt, tp / np.where(in_gt, gt_count, 1.0), 0.0)
        total = cm.sum()
        return {
            "mIoU": _pct(iou[present].mean()) if present.any() else None,
            "pixel_accuracy": _pct(tp.sum() / total) if total else None,
            "mean_accuracy": _pct(acc[in_gt].mean()) if in_gt.any() else None,
            "n": int(present.sum()),
            "per_class": {c: (_pct(iou[c]) if present[c] else None) for c in range(self.num_classes)},
        }


def mean_iou(
    gt_maps: Iterable[np.ndarray], pred_maps: Iterable[np.ndarray], num_classes: int, ignore_index: int = 255
) -> dict[str, Any]:
    """Dataset mIoU from one confusion matrix (see the module docstring for the convention).

    Args:
        gt_maps: (H, W) GT class maps; ``ignore_index`` marks void.
        pred_maps: (H, W) predicted class maps in 0..num_classes-1, same sizes and order.

    Returns:
        ``{"mIoU", "pixel_accuracy", "mean_accuracy", "n", "per_class": {class: IoU or None}}``, 0..100.
    """
    acc = MeanIoU(num_classes, ignore_index)
    for g, p in zip(gt_maps, pred_maps, strict=True):  # lengths must agree
        acc.update(g, p)
    return acc.compute()
