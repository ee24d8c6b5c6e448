"""Metrics (PQ, mask AP, mIoU) on hand-made cases, PQ against hotcoco, and ``m2f eval`` end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from m2f.metrics import mask_ap, mean_iou, panoptic_quality

# person, car: things; sky, grass: stuff
CATEGORIES = [
    {"id": 0, "name": "person", "isthing": 1},
    {"id": 1, "name": "car", "isthing": 1},
    {"id": 2, "name": "sky", "isthing": 0},
    {"id": 3, "name": "grass", "isthing": 0},
]


def seg(sid: int, cat: int, crowd: int = 0) -> dict:
    return {"id": sid, "category_id": cat, "iscrowd": crowd}


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def rle(mask: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def hand_case() -> tuple[tuple[np.ndarray, list], tuple[np.ndarray, list]]:
    """10x10 GT and prediction with every rule of the PQ matching in play (see test_pq_hand_case)."""
    gt = np.zeros((10, 10), np.int64)  # rows 8 and 9 (cols 0-7) stay void
    gt[0:4, 0:5] = 1  # person, 20 px
    gt[0:4, 5:10] = 2  # car, 20 px
    gt[4:8, :] = 3  # sky, 40 px
    gt[9, 8:10] = 4  # car crowd, 2 px
    gt_segments = [seg(1, 0), seg(2, 1), seg(3, 2), seg(4, 1, crowd=1)]

    pred = np.zeros((10, 10), np.int64)
    pred[0:4, 0:4] = 10  # person, 16 px
    pred[0:2, 4:10] = 11  # car, 12 px
    pred[4:9, :] = 12  # sky, 50 px (10 of them on void)
    pred[9, 0:8] = 13  # grass: 8 px on void ...
    pred[2:4, 4] = 13  # ... and 2 px on the person: 10 px
    pred[2:4, 5:10] = 14  # person, 10 px on the car
    pred[9, 8:10] = 15  # car, 2 px on the car crowd
    pred_segments = [seg(10, 0), seg(11, 1), seg(12, 2), seg(13, 3), seg(14, 0), seg(15, 1)]
    return (gt, gt_segments), (pred, pred_segments)


# ---------------------------------------------------------------------------------------------- PQ
def test_pq_perfect_prediction():
    (gt, segments), _ = hand_case()
    renumbered = np.where(gt > 0, gt + 100, 0)  # ids need not agree, only the segments
    pred_segments = [seg(s["id"] + 100, s["category_id"]) for s in segments if not s["iscrowd"]]
    pred = np.where(gt == 4, 0, renumbered)  # nothing predicted on the crowd
    r = panoptic_quality([(gt, segments)], [(pred, pred_segments)], CATEGORIES)
    for split, n in (("all", 3), ("things", 2), ("stuff", 1)):
        assert r[split] == pytest.approx({"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": n})
    assert r["per_class"][3]["pq"] is None  # grass is nowhere: not in the means


def test_pq_empty_prediction():
    (gt, segments), _ = hand_case()
    r = panoptic_quality([(gt, segments)], [(np.zeros_like(gt), [])], CATEGORIES)
    assert r["all"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 3}
    assert r["things"]["n"] == 2 and r["stuff"]["n"] == 1
    assert [r["per_class"][c]["fn"] for c in range(4)] == [1, 1, 1, 0]  # the crowd is no FN


def test_pq_hand_case():
    # person: GT 1 (20 px) vs pred 10 (16 px): inter 16, union 16 + 20 - 16 = 20, IoU 0.8 -> TP.
    #   pred 14 (person, on the car, no void) -> FP.  PQ = 0.8 / (1 + 0.5) = 53.33, SQ 80, RQ 1/1.5 = 66.67
    # car: GT 2 (20 px) vs pred 11 (12 px): inter 10, union 12 + 20 - 10 = 22, IoU 0.4545 -> no match:
    #   GT 2 is a FN, pred 11 a FP (none of it on void or crowd). PQ = SQ = RQ = 0.
    #   pred 15 (car, 2 px all on the car crowd GT 4) is ignored; the crowd itself is no FN.
    # sky: GT 3 (40 px) vs pred 12 (50 px, 10 on void): inter 40, union 50 + 40 - 40 - 10 = 40, IoU 1.0
    #   (0.8 without the void rule) -> PQ = SQ = RQ = 100.
    # grass: pred 13 has 8 of its 10 px on void (80% > 50%) -> ignored, not a FP; grass has no TP/FP/FN
    #   and is left out of the means.
    # things = mean(person, car): PQ (53.33 + 0) / 2 = 26.67, SQ (80 + 0) / 2 = 40, RQ (66.67 + 0) / 2 = 33.33
    # stuff = sky: 100, 100, 100
    # all = mean(person, car, sky): PQ (53.33 + 0 + 100) / 3 = 51.11, SQ (80 + 0 + 100) / 3 = 60,
    #   RQ (66.67 + 0 + 100) / 3 = 55.56
    gt, pred = hand_case()
    r = panoptic_quality([gt], [pred], CATEGORIES)
    assert r["things"] == pytest.approx({"pq": 80 / 3, "sq": 40.0, "rq": 100 / 3, "n": 2})
    assert r["stuff"] == pytest.approx({"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 1})
    assert r["all"] == pytest.approx({"pq": (160 / 3 + 100) / 3, "sq": 60.0, "rq": (200 / 3 + 100) / 3, "n": 3})
    counts = {c: (v["tp"], v["fp"], v["fn"]) for c, v in r["per_class"].items()}
    assert counts == {0: (1, 1, 0), 1: (0, 1, 1), 2: (1, 0, 0), 3: (0, 0, 0)}
    assert r["per_class"][0]["pq"] == pytest.approx(160 / 3)
    assert r["per_class"][3]["name"] == "grass"
    assert r["per_class"][3]["pq"] is None

    # Over two images the counts add up before the per-class ratios are taken.
    r2 = panoptic_quality([gt, gt], [pred, pred], CATEGORIES)
    assert r2["all"] == pytest.approx(r["all"])
    assert r2["per_class"][1]["fp"] == 2


def test_pq_rejects_bad_input():
    (gt, segments), (pred, pred_segments) = hand_case()
    with pytest.raises(ValueError, match="not in its segments_info"):
        panoptic_quality([(gt, segments)], [(pred, pred_segments[:-1])], CATEGORIES)
    with pytest.raises(ValueError, match="not among the categories"):
        panoptic_quality([(gt, segments)], [(pred, [*pred_segments[:-1], seg(15, 9)])], CATEGORIES)
    with pytest.raises(ValueError, match="no pixels"):
        panoptic_quality([(gt, segments)], [(pred, [*pred_segments, seg(99, 0)])], CATEGORIES)
    with pytest.raises(ValueError):
        panoptic_quality([(gt, segments)], [], CATEGORIES)


# ---------------------------------------------------------------------------------------------- PQ vs hotcoco
HC_CATEGORIES = [{"id": i, "name": f"c{i}", "isthing": int(i < 4), "color": [i, i, i]} for i in range(7)]


def random_panoptic(rng: np.random.Generator, h: int, w: int, base: np.ndarray | None = None):
    """A random panoptic image: rectangles of random categories over void; stuff merged per category."""
    if base is not None:  # a prediction: the GT shifted by a few pixels, plus noise rectangles
        ids = np.roll(base, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        n_rect = int(rng.integers(2, 6))
    else:
        ids = np.zeros((h, w), np.int64)
        n_rect = int(rng.integers(6, 14))
    start = int(ids.max()) + 1
    for k in range(n_rect):
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        ids[y : y + int(rng.integers(4, h // 2)), x : x + int(rng.integers(4, w // 2))] = start + k
    if base is not None and rng.random() < 0.5:
        ids[: int(rng.integers(1, 8)), :] = 0  # a band of predicted void
    return ids


def random_dataset(seed: int, n_images: int = 6, h: int = 40, w: int = 56):
    """GT and predictions as (id map, segments_info) lists, COCO-consistent (stuff and crowd one per class)."""
    rng = np.random.default_rng(seed)
    gt, pred = [], []
    for _ in range(n_images):
        raw = random_panoptic(rng, h, w)
        raw_ids = [int(i) for i in np.unique(raw) if i != 0]
        cat = {i: int(rng.integers(0, 7)) for i in raw_ids}
        crowd = {i: int(cat[i] < 4 and rng.random() < 0.2) for i in raw_ids}
        # One segment per stuff category and one crowd segment per thing category (COCO's convention).
        key = {i: (cat[i], "stuff") if cat[i] >= 4 else (cat[i], "crowd") if crowd[i] else i for i in raw_ids}
        new_id = {k: n + 1 for n, k in enumerate(dict.fromkeys(key.values()))}
        gt_map = np.zeros_like(raw)
        for i in raw_ids:
            gt_map[raw == i] = new_id[key[i]]
        gt_segments = {new_id[key[i]]: seg(new_id[key[i]], cat[i], crowd[i]) for i in raw_ids}
        gt.append((gt_map, list(gt_segments.values())))

        praw = random_panoptic(rng, h, w, base=gt_map)
        pred_cat = {}
        for i in (int(i) for i in np.unique(praw) if i != 0):
            c = gt_segments[i]["category_id"] if i in gt_segments else int(rng.integers(0, 7))
            pred_cat[i] = c if rng.random() > 0.15 else int(rng.integers(0, 7))
        # Predicted ids anywhere in 1..256^3-1: the PNG's three channels all in use.
        big = {i: int(v) for i, v in zip(pred_cat, rng.choice((1 << 24) - 1, len(pred_cat), replace=False) + 1)}
        pred_map = np.zeros_like(praw)
        for i, v in big.items():
            pred_map[praw == i] = v
        pred.append((pred_map, [seg(big[i], c) for i, c in pred_cat.items()]))
    return gt, pred


def hotcoco_pq(tmp_path, gt, pred, categories) -> dict:
    panoptic = pytest.importorskip("hotcoco.panoptic")
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    images, gt_anns, pred_anns = [], [], []
    for n, ((gm, gs), (pm, ps)) in enumerate(zip(gt, pred)):
        name = f"{n:06d}.png"
        Image.fromarray(id_to_rgb(gm)).save(tmp_path / "gt" / name)
        Image.fromarray(id_to_rgb(pm)).save(tmp_path / "pred" / name)
        images.append({"id": n, "file_name": f"{n:06d}.jpg", "height": gm.shape[0], "width": gm.shape[1]})
        gs = [s | {"area": int((gm == s["id"]).sum()), "bbox": [0, 0, 1, 1]} for s in gs]
        gt_anns.append({"image_id": n, "file_name": name, "segments_info": gs})
        pred_anns.append({"image_id": n, "file_name": name, "segments_info": ps})
    gt_json = {"images": images, "annotations": gt_anns, "categories": categories}
    pred_json = {"images": images, "annotations": pred_anns, "categories": categories}
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    ev = panoptic.PanopticEval(
        tmp_path / "gt.json", tmp_path / "pred.json", gt_folder=tmp_path / "gt", pred_folder=tmp_path / "pred"
    )
    ev.evaluate()
    assert ev.reference_deviations() == []  # hotcoco computes panopticapi's numbers for this input
    return ev.results()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pq_agrees_with_hotcoco(tmp_path, seed):
    gt, pred = random_dataset(seed)
    ours = panoptic_quality(gt, pred, HC_CATEGORIES)
    ref = hotcoco_pq(tmp_path, gt, pred, HC_CATEGORIES)
    for split, ref_split in (("all", "All"), ("things", "Things"), ("stuff", "Stuff")):
        assert ours[split]["n"] == ref[ref_split]["n"]
        for k in ("pq", "sq", "rq"):
            assert ours[split][k] == pytest.approx(100 * ref[ref_split][k], abs=0.01), (split, k)
    for cid, c in ours["per_class"].items():
        r = ref["per_class"][cid]
        assert (c["tp"], c["fp"], c["fn"]) == (r["tp"], r["fp"], r["fn"]), cid
        for k in ("pq", "sq", "rq"):
            assert (c[k] if c[k] is not None else -100.0) == pytest.approx(100 * r[k], abs=0.01)
    # The data exercise the rules: crowds, predictions ignored on void/crowd, misses and matches.
    n_pred = sum(len(s) for _, s in pred)
    tp, fp = (sum(c[k] for c in ours["per_class"].values()) for k in ("tp", "fp"))
    assert any(s["iscrowd"] for _, segs in gt for s in segs)
    assert 0 < tp < n_pred and fp > 0 and tp + fp < n_pred


def test_pq_hand_case_agrees_with_hotcoco(tmp_path):
    gt, pred = hand_case()
    ours = panoptic_quality([gt], [pred], CATEGORIES)
    ref = hotcoco_pq(tmp_path, [gt], [pred], [c | {"color": [0, 0, 0]} for c in CATEGORIES])
    assert ours["all"]["pq"] == pytest.approx(100 * ref["All"]["pq"], abs=0.01)
    assert ours["things"]["sq"] == pytest.approx(100 * ref["Things"]["sq"], abs=0.01)


# ---------------------------------------------------------------------------------------------- mask AP
def instances_gt() -> dict:
    rng = np.random.default_rng(3)
    images, anns = [], []
    for img_id in (1, 2):
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": 32, "width": 48})
        for k in range(3):
            m = np.zeros((32, 48), bool)
            y, x = int(rng.integers(0, 20)), int(rng.integers(0, 36))
            m[y : y + 10, x : x + 10] = True
            r = rle(m)
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": k % 2, "segmentation": r, "iscrowd": 0,
                "area": float(mask_util.area(r)), "bbox": mask_util.toBbox(r).tolist(),
            })  # fmt: skip
    cats = [{"id": 0, "name": "person"}, {"id": 1, "name": "car"}]
    return {"images": images, "annotations": anns, "categories": cats}


def test_mask_ap_perfect_and_empty(tmp_path):
    gt = instances_gt()
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 0.9}
        for a in gt["annotations"]
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    r = mask_ap(path, perfect)
    assert (r["AP"], r["AP50"], r["AP75"], r["APs"]) == pytest.approx((100.0, 100.0, 100.0, 100.0))
    assert r["APm"] is None and r["APl"] is None  # every GT instance is small (100 px)
    assert r["num_predictions"] == len(perfect) and r["num_images"] == 2
    assert perfect[0].keys() == {"image_id", "category_id", "segmentation", "score"}  # inputs not mutated

    empty = mask_ap(gt, [])
    assert (empty["AP"], empty["AP50"], empty["AP75"]) == (0.0, 0.0, 0.0)

    # A wrong class everywhere scores 0; one image only: the other's GT does not count.
    wrong = [p | {"category_id": 1 - p["category_id"]} for p in perfect]
    assert mask_ap(gt, wrong)["AP"] == 0.0
    assert mask_ap(gt, perfect[:3], image_ids=[1])["AP"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------- mIoU
def test_mean_iou_hand_confusion():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 3]])  # the 3s lie on ignored pixels: not counted
    # confusion (rows GT, cols pred): GT 0 -> {0: 1, 1: 1}; GT 1 -> {1: 2}; GT 2 -> {2: 1, 0: 1}
    # IoU 0 = 1 / (2 + 2 - 1) = 1/3; IoU 1 = 2 / (2 + 3 - 2) = 2/3; IoU 2 = 1 / (2 + 1 - 1) = 1/2
    # mIoU = (1/3 + 2/3 + 1/2) / 3 = 50; pixel acc = 4 / 6; mean acc = (1/2 + 1 + 1/2) / 3 = 2/3
    r = mean_iou([gt], [pred], num_classes=5)
    assert r["mIoU"] == pytest.approx(50.0)
    assert r["pixel_accuracy"] == pytest.approx(400 / 6)
    assert r["mean_accuracy"] == pytest.approx(200 / 3)
    assert r["n"] == 3
    assert r["per_class"] == pytest.approx({0: 100 / 3, 1: 200 / 3, 2: 50.0, 3: None, 4: None})

    # A class only predicted counts with IoU 0: (1/2 + 0) / 2 = 25.
    assert mean_iou([np.array([[0, 0]])], [np.array([[0, 4]])], 5)["mIoU"] == pytest.approx(25.0)
    # Perfect.
    assert mean_iou([gt], [np.where(gt == 255, 0, gt)], 5)["mIoU"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        mean_iou([gt], [pred + 5], 5)


# ---------------------------------------------------------------------------------------------- m2f eval
EVAL_CATEGORIES = [{"id": i, "name": f"class_{i}", "isthing": int(i < 3), "color": [40 * i, 0, 0]} for i in range(5)]


def write_dataset(root, sizes=((48, 64), (64, 48), (40, 40))):
    """A tiny dataset in the ``m2f synth`` format: images/, panoptic/ + panoptic.json, instances.json, semantic/."""
    rng = np.random.default_rng(7)
    for d in ("images", "panoptic", "semantic"):
        (root / d).mkdir(parents=True)
    images, pan_anns, inst_anns = [], [], []
    for n, (h, w) in enumerate(sizes):
        name = f"{n:06d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        ids = np.zeros((h, w), np.int64)
        sem = np.full((h, w), 255, np.uint8)
        segments = []
        layout = [(3, 0, h // 2, 0, w), (4, h // 2, h, 0, w), (0, 2, 14, 2, 14), (1, h - 16, h - 2, 20, 34)]
        for sid, (cat, y0, y1, x0, x1) in enumerate(layout, start=1):
            ids[y0:y1, x0:x1] = sid
            sem[y0:y1, x0:x1] = cat
        ids[h - 3 :, :] = 0  # a void band
        sem[h - 3 :, :] = 255
        for sid, (cat, *_) in enumerate(layout, start=1):
            m = ids == sid
            r = rle(m)
            box = mask_util.toBbox(r).tolist()
            segments.append({"id": sid, "category_id": cat, "iscrowd": 0, "bbox": box, "area": int(m.sum())})
            if cat < 3:
                inst_anns.append({
                    "id": len(inst_anns) + 1, "image_id": n, "category_id": cat, "segmentation": r,
                    "area": int(m.sum()), "bbox": box, "iscrowd": 0,
                })  # fmt: skip
        Image.fromarray(id_to_rgb(ids)).save(root / "panoptic" / f"{name}.png")
        Image.fromarray(sem).save(root / "semantic" / f"{name}.png")
        images.append({"id": n, "file_name": f"{name}.png", "width": w, "height": h})
        pan_anns.append({"image_id": n, "file_name": f"{name}.png", "segments_info": segments})
    (root / "panoptic.json").write_text(
        json.dumps({"images": images, "annotations": pan_anns, "categories": EVAL_CATEGORIES})
    )
    things = [{"id": c["id"], "name": c["name"]} for c in EVAL_CATEGORIES if c["isthing"]]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": inst_anns, "categories": things}))
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    from mask2former.reference import TINY, save_hf_checkpoint

    folder = save_hf_checkpoint(TINY, tmp_path_factory.mktemp("tiny"), seed=5)
    config = json.loads((folder / "config.json").read_text())
    config["thing_ids"] = [0, 1, 2]
    (folder / "config.json").write_text(json.dumps(config))
    # Small inputs keep the test fast (the COCO default would resize 48 px to 800 px).
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 96, "longest_edge": 160}}))
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def test_evaluate_all_tasks(tiny_checkpoint, dataset, tmp_path):
    from m2f.evaluate import evaluate, format_report
    from mask2former import load_model

    model = load_model(tiny_checkpoint)
    r = evaluate(model, dataset, "panoptic", batch_size=2, progress=False)
    assert r["num_images"] == 3 and r["task"] == "panoptic"
    m = r["metrics"]
    assert m["num_images"] == 3 and m["all"]["n"] >= 4  # every GT category (0, 1, 3, 4) is counted
    assert all(0 <= m[s][k] <= 100 for s in ("all", "things", "stuff") for k in ("pq", "sq", "rq"))
    assert sum(c["fn"] for c in m["per_class"].values()) + sum(c["tp"] for c in m["per_class"].values()) == 12
    # With every query let through the random model predicts segments: the matching runs on real output.
    model.config = dataclasses.replace(model.config, threshold=0.0, overlap_mask_area_threshold=0.0)
    low = evaluate(model, dataset, "panoptic", batch_size=3, limit=2, progress=False)
    assert low["num_images"] == 2
    assert sum(c["tp"] + c["fp"] for c in low["metrics"]["per_class"].values()) > 0
    assert "PQ" in format_report(low)

    r = evaluate(model, dataset, "instance", batch_size=2, progress=False)["metrics"]
    assert r["num_predictions"] > 0 and r["num_images"] == 3
    assert 0 <= r["AP"] <= 100 and 0 <= r["AP50"] <= 100

    r = evaluate(model, dataset, "semantic", batch_size=4, progress=False)
    assert 0 <= r["metrics"]["mIoU"] <= 100 and 0 <= r["metrics"]["pixel_accuracy"] <= 100
    assert "mIoU" in format_report(r)

    # Without the JSON files the semantic task pairs semantic/*.png with the images of the same stem.
    bare = tmp_path / "bare"
    shutil.copytree(dataset, bare, ignore=shutil.ignore_patterns("*.json"))
    assert evaluate(model, bare, "semantic", progress=False)["metrics"] == r["metrics"]


def test_eval_cli_json(tiny_checkpoint, dataset, capsys):
    from m2f.cli import main

    for task in ("panoptic", "instance", "semantic"):
        argv = ["eval", "--weights", str(tiny_checkpoint), "--data", str(dataset), "--task", task, "--json"]
        assert main([*argv, "--batch-size", "2"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["task"] == task and out["num_images"] == 3 and "metrics" in out
    assert main(["eval", "--weights", str(tiny_checkpoint), "--data", str(dataset), "--task", "instance"]) == 0
    table = capsys.readouterr().out
    assert "AP50" in table and "image(s)" in table
    assert main(["eval", "--weights", str(tiny_checkpoint), "--data", str(dataset / "nope")]) == 2
