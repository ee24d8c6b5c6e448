"""``m2f predict`` end to end, the JSON/RLE encoding, and the overlay.

``m2f predict`` post-processes with the numpy module (the serving path), so its output must equal that
module's result on the same logits exactly. numpy vs the torch oracle is tested in
tests/test_postprocess_numpy.py, where the two may differ on near-tie pixels only (their float32 sums run in
a different order, and which pixels tie depends on the CPU's BLAS kernels).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from m2f.cli import main
from m2f.visualize import draw_overlay
from mask2former import load_model
from mask2former.reference import TINY, save_hf_checkpoint
from pipeline import postprocess as postprocess
from pipeline.encoding import encode_masks, panoptic_png, segment_records
from pipeline.processing import load_image, preprocess

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = save_hf_checkpoint(TINY, tmp_path_factory.mktemp("tiny"), seed=5)
    config = json.loads((folder / "config.json").read_text())
    config["thing_ids"] = [0, 1, 2]  # things do not merge, so the random model gives several segments
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    pixels = (rng.random((150, 230, 3)) * 255).astype(np.uint8)  # no side a multiple of 32
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def model_outputs(checkpoint, image_path):
    model = load_model(checkpoint)
    batch = preprocess([load_image(image_path)], model.config.preprocess)
    with torch.inference_mode():
        out = model(torch.from_numpy(batch.pixel_values))
    return model, (out.class_logits.numpy(), out.mask_logits.numpy(), batch.resized_sizes, batch.original_sizes)


def decode(record) -> np.ndarray:
    return mask_util.decode(record["segmentation"]).astype(bool)


def run_predict(tmp_path, checkpoint, image_path, task, *extra):
    out = tmp_path / f"{task}.json"
    assert main(["predict", str(image_path), "--weights", str(checkpoint), "--task", task, "-o", str(out), *extra]) == 0
    result = json.loads(out.read_text())
    assert (result["width"], result["height"], result["task"]) == (230, 150, task)
    assert set(result["timings"]) == {"preprocess_s", "inference_s", "postprocess_s"}
    for seg in result["segments"]:
        assert seg["segmentation"]["size"] == [150, 230] and isinstance(seg["segmentation"]["counts"], str)
        mask = decode(seg)
        assert seg["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    return result


def test_predict_panoptic_matches_direct_call(tmp_path, checkpoint, image_path):
    opts = {"threshold": 0.0, "overlap_mask_area_threshold": 0.05}
    flags = [f for k, v in opts.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    result = run_predict(tmp_path, checkpoint, image_path, "panoptic", *flags)
    model, args = model_outputs(checkpoint, image_path)
    assert model.config.thing_ids == {0, 1, 2}
    direct = postprocess.panoptic_segmentation(*args, thing_ids=model.config.thing_ids, **opts)[0]
    assert [s["id"] for s in result["segments"]] == [s.id for s in direct.segments]
    assert len(result["segments"]) >= 2, "the fixture should give several segments"
    union = np.zeros((150, 230), int)
    for seg in result["segments"]:
        mask = decode(seg)
        np.testing.assert_array_equal(mask, direct.segmentation == seg["id"])
        union += mask
    assert union.max() <= 1, "panoptic segments must not overlap"
    assert union.sum() == sum(s["area"] for s in result["segments"]) == (direct.segmentation > 0).sum()


def test_predict_instance_matches_direct_call(tmp_path, checkpoint, image_path):
    result = run_predict(tmp_path, checkpoint, image_path, "instance", "--max-instances", "7")
    model, args = model_outputs(checkpoint, image_path)
    kwargs = model.config.postprocess_kwargs("instance")
    direct = postprocess.instance_segmentation(*args, **kwargs, max_instances=7)[0]
    assert len(result["segments"]) == len(direct.masks) <= 7
    for seg, mask, label, score in zip(result["segments"], direct.masks, direct.labels, direct.scores, strict=True):
        np.testing.assert_array_equal(decode(seg), mask)
        assert seg["category_id"] == label.item() and seg["score"] == pytest.approx(score.item(), abs=1e-6)


def test_predict_semantic_one_segment_per_class(tmp_path, checkpoint, image_path):
    result = run_predict(tmp_path, checkpoint, image_path, "semantic")
    _, args = model_outputs(checkpoint, image_path)
    label_map = postprocess.semantic_segmentation(*args)[0]
    assert sorted(s["category_id"] for s in result["segments"]) == np.unique(label_map).tolist()
    for seg in result["segments"]:
        np.testing.assert_array_equal(decode(seg), label_map == seg["category_id"])
        assert seg["score"] is None


def test_predict_overlay_and_console_script(tmp_path, checkpoint, image_path):
    overlay = tmp_path / "overlay.png"
    cmd = [sys.executable, "-m", "m2f.cli", "predict", str(image_path), "--weights", str(checkpoint)]
    proc = subprocess.run([*cmd, "--overlay", str(overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["task"] == "panoptic"
    assert Image.open(overlay).size == (230, 150)


def test_predict_errors_are_clear(tmp_path, checkpoint, image_path, capsys):
    assert main(["predict", str(tmp_path / "missing.jpg"), "--weights", str(checkpoint)]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["predict", str(tmp_path / "notes.txt"), "--weights", str(checkpoint)]) == 2
    assert "notes.txt: cannot read it as an image" in capsys.readouterr().err  # the file by name, not a buffer object
    assert main(["predict", str(image_path), "--weights", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_rle_round_trip_is_exact():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 37, 53)) > 0.6
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [37, 53] for r in rles)
    decoded = np.stack([mask_util.decode(r) for r in rles]).astype(bool)
    np.testing.assert_array_equal(decoded, masks)
    assert encode_masks(np.zeros((0, 4, 4), bool)) == []


def test_segment_records_fields():
    masks = np.zeros((2, 10, 12), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 6:, :] = True
    recs = segment_records(masks, [4, 1], [0.9, 0.5], {1: "sky", 4: "dog"}, {4}, ids=[7, 8])
    assert [r["id"] for r in recs] == [7, 8]
    assert recs[0] | {"segmentation": None} == {
        "id": 7, "category_id": 4, "label": "dog", "isthing": True, "score": 0.9, "area": 18, "bbox": [3, 2, 6, 3],
        "segmentation": None,
    }  # fmt: skip
    assert recs[1]["isthing"] is False and recs[1]["bbox"] == [0, 6, 12, 4] and recs[1]["area"] == 48


def test_panoptic_png_ids():
    ids = np.array([[0, 1, 255], [256, 65793, 70000]])
    png = panoptic_png(ids).astype(np.int64)
    np.testing.assert_array_equal(png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2], ids)


def test_overlay_colours_only_segments():
    image = Image.new("RGB", (40, 30), (100, 100, 100))
    masks = np.zeros((1, 30, 40), bool)
    masks[0, 10:20, 15:35] = True
    seg = segment_records(masks, [0], [0.9], {0: "x"}, set())
    out = np.asarray(draw_overlay(image, seg))
    assert (out[25, 5] == 100).all(), "pixels outside every segment keep their colour"
    assert not (out[15, 25] == 100).all(), "pixels inside a segment are tinted"
    assert not (out[10, 25] == out[15, 25]).all(), "the outline differs from the fill"
