"""Segmentation results -> COCO-style JSON: RLE masks (pycocotools), boxes [x, y, w, h], areas.

Works on numpy arrays only, so the ONNX Runtime path can use it without torch. Panoptic and semantic
RLEs come from one pass over the id map; instance RLEs arrive built (``postprocess.instance_rles``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from pipeline.rle import id_map_rles


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) bool -> N COCO RLEs ``{"size": [h, w], "counts": str}`` (column-major, as COCO)."""
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def records(
    rles: list[dict[str, Any]],
    label_ids: list[int],
    scores: list[float],
    id2label: dict[int, str],
    thing_ids: frozenset[int] | set[int],
    ids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """One JSON record per RLE: id, category_id, label, isthing, score, area, bbox, segmentation.

    Area and box come from the RLE (pycocotools), not from a dense mask.
    """
    coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    boxes = mask_util.toBbox(coded).tolist() if coded else []
    areas = mask_util.area(coded).tolist() if coded else []
    ids = ids if ids is not None else list(range(1, len(rles) + 1))
    return [
        {
            "id": int(seg_id),
            "category_id": int(label),
            "label": id2label.get(int(label), str(label)),
            "isthing": int(label) in thing_ids,
            "score": round(float(score), 6),
            "area": int(area),
            "bbox": [int(v) for v in box],
            "segmentation": rle,
        }
        for seg_id, label, score, area, box, rle in zip(ids, label_ids, scores, areas, boxes, rles, strict=True)
    ]


def segment_records(
    masks: np.ndarray,
    label_ids: list[int],
    scores: list[float],
    id2label: dict[int, str],
    thing_ids: frozenset[int] | set[int],
    ids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """:func:`records` of (N, H, W) bool masks."""
    return records(encode_masks(masks), label_ids, scores, id2label, thing_ids, ids)


def panoptic_png(segmentation: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 COCO panoptic PNG colours (id = R + 256 G + 256^2 B)."""
    ids = segmentation.astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def panoptic_records(
    segmentation: np.ndarray, segments: list, id2label: dict[int, str], thing_ids: frozenset[int] | set[int]
) -> list[dict[str, Any]]:
    """Records of a panoptic result: (H, W) id map (0 = void) and its segments (``id``, ``label_id``, ``score``).

    The RLEs of all segments come from one pass over the id map (:func:`pipeline.rle.id_map_rles`).
    """
    ids = [s.id for s in segments]
    return records(
        id_map_rles(segmentation, ids),
        [s.label_id for s in segments],
        [s.score for s in segments],
        id2label,
        thing_ids,
        ids,
    )


def instance_records(
    rles: list[dict[str, Any]], labels: np.ndarray, scores: np.ndarray, id2label: dict[int, str], thing_ids
) -> list[dict[str, Any]]:
    """Records of an instance result: its masks' COCO RLEs with their labels and scores."""
    return records(rles, labels.tolist(), scores.tolist(), id2label, thing_ids)


def semantic_records(label_map: np.ndarray, id2label: dict[int, str], thing_ids) -> list[dict[str, Any]]:
    """One record per class present in the (H, W) label map; ``id`` and ``category_id`` are the class id.

    A semantic map carries no per-segment confidence, so ``score`` is null.
    """
    present = np.flatnonzero(np.bincount(label_map.reshape(-1), minlength=1)).tolist()  # class ids >= 0
    out = records(id_map_rles(label_map, present), present, [0.0] * len(present), id2label, thing_ids, present)
    for r in out:
        r["score"] = None
    return out
