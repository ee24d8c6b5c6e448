"""The synthetic panoptic dataset: determinism, ground-truth consistency, variety, file formats."""

from __future__ import annotations

import colorsys
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from m2f import synth
from m2f.cli import main

SIZES = [(160, 160), (96, 128), (64, 64)]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _check_consistent(sample: synth.Sample, size: tuple[int, int]) -> None:
    image, panoptic, segments = sample
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert panoptic.shape == size and panoptic.dtype == np.int32
    ids = [s["id"] for s in segments]
    assert len(set(ids)) == len(ids) and min(ids) >= 1
    assert (panoptic > 0).all(), "every pixel belongs to a segment (no void)"
    assert set(np.unique(panoptic).tolist()) == set(ids)
    stuff_seen = []
    for s in segments:
        assert set(s) == {"id", "category_id", "iscrowd", "bbox", "area"}
        assert s["iscrowd"] == 0
        cat = synth.CATEGORIES[s["category_id"]]
        mask = panoptic == s["id"]
        assert s["area"] == int(mask.sum())
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert s["bbox"] == mask_util.toBbox(rle).astype(int).tolist()
        assert all(isinstance(v, int) for v in [*s["bbox"], s["area"], s["id"], s["category_id"]])
        assert s["area"] >= synth.min_area(size)
        if not cat["isthing"]:
            stuff_seen.append(s["category_id"])
    assert len(stuff_seen) == len(set(stuff_seen)) >= 1, "one segment per stuff class present"
    sem = synth.semantic_map(sample)
    for s in segments:
        assert (sem[panoptic == s["id"]] == s["category_id"]).all()


def test_categories():
    cats = synth.CATEGORIES
    assert [c["id"] for c in cats] == list(range(len(cats)))
    assert len({c["name"] for c in cats}) == len(cats)
    assert all(c["isthing"] in (0, 1) and len(c["color"]) == 3 for c in cats)
    assert [c["id"] for c in cats if c["isthing"]] == list(synth.THING_IDS)
    assert [c["id"] for c in cats if not c["isthing"]] == list(synth.STUFF_IDS)
    assert len(synth.THING_IDS) >= 4 and len(synth.STUFF_IDS) == 3


def test_make_sample_is_deterministic():
    a, b = synth.make_sample(3, 7), synth.make_sample(3, 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.panoptic, b.panoptic)
    assert a.segments == b.segments
    assert not np.array_equal(a.image, synth.make_sample(4, 7).image)
    assert not np.array_equal(a.image, synth.make_sample(3, 8).image)
    assert not np.array_equal(a.image[:64, :64], synth.make_sample(3, 7, (64, 64)).image)


@pytest.mark.parametrize("size", SIZES)
def test_samples_are_consistent(size):
    for index in range(50):
        _check_consistent(synth.make_sample(0, index, size), size)


def test_small_stuff_bands_merge_into_a_neighbour(monkeypatch):
    # Three bands always; a high minimum area makes some bands too small: they must merge, not go void.
    monkeypatch.setattr(synth, "_LAYOUTS", ((synth.SKY, synth.WATER, synth.GROUND),))
    monkeypatch.setattr(synth, "MIN_AREA", 6000)
    stuff_counts = []
    for index in range(30):
        sample = synth.make_sample(0, index)
        _check_consistent(sample, (160, 160))
        stuff_counts.append(sum(not synth.CATEGORIES[s["category_id"]]["isthing"] for s in sample.segments))
    assert min(stuff_counts) < 3 and max(stuff_counts) == 3


def test_variety():
    samples = [synth.make_sample(1, i) for i in range(50)]
    cats = {s["category_id"] for sample in samples for s in sample.segments}
    assert cats == {c["id"] for c in synth.CATEGORIES}
    counts = [sum(synth.CATEGORIES[s["category_id"]]["isthing"] for s in sample.segments) for sample in samples]
    assert min(counts) >= 1 and len(set(counts)) >= 4
    stuff_counts = {len(sample.segments) - n for sample, n in zip(samples, counts)}
    assert stuff_counts == {2, 3}

    def things_touch(sample: synth.Sample) -> bool:  # two thing segments share a pixel edge: overlap/occlusion
        thing = np.isin(sample.panoptic, [s["id"] for s in sample.segments if s["category_id"] in synth.THING_IDS])
        p = sample.panoptic
        horiz = (p[:, 1:] != p[:, :-1]) & thing[:, 1:] & thing[:, :-1]
        vert = (p[1:] != p[:-1]) & thing[1:] & thing[:-1]
        return bool(horiz.any() or vert.any())

    assert sum(things_touch(s) for s in samples) >= 5
    areas = [s["area"] for sample in samples for s in sample.segments if s["category_id"] in synth.THING_IDS]
    assert min(areas) < 300 and max(areas) > 2000  # small and large things
    hue_bins = set()  # thing colours are of any hue
    for sample in samples:
        for s in sample.segments:
            if s["category_id"] in synth.THING_IDS:
                r, g, b = sample.image[sample.panoptic == s["id"]].mean(axis=0) / 255
                hue_bins.add(int(colorsys.rgb_to_hsv(r, g, b)[0] * 6) % 6)
    assert hue_bins == set(range(6))


def test_make_sample_is_fast():
    synth.make_sample(0, 0)
    start = time.perf_counter()
    for index in range(50):
        synth.make_sample(0, index)
    assert (time.perf_counter() - start) / 50 < 0.05


def test_write_dataset_files(tmp_path):
    size = (96, 128)
    synth.write_dataset(tmp_path, 6, seed=2, size=size)
    pan = json.loads((tmp_path / "panoptic.json").read_text())
    inst = json.loads((tmp_path / "instances.json").read_text())
    assert list(pan) == ["info", "images", "annotations", "categories"]
    assert pan["categories"] == synth.CATEGORIES
    assert inst["categories"] == [c for c in synth.CATEGORIES if c["isthing"]]
    assert pan["images"] == inst["images"]
    assert [im["id"] for im in pan["images"]] == list(range(6))
    assert all(im["width"] == 128 and im["height"] == 96 for im in pan["images"])
    inst_by_image: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        inst_by_image.setdefault(a["image_id"], []).append(a)
    assert [a["id"] for a in inst["annotations"]] == list(range(1, len(inst["annotations"]) + 1))

    for im, ann in zip(pan["images"], pan["annotations"]):
        sample = synth.make_sample(2, im["id"], size)
        assert ann["image_id"] == im["id"] and ann["segments_info"] == sample.segments
        image = np.asarray(Image.open(tmp_path / "images" / im["file_name"]))
        assert image.dtype == np.uint8 and np.array_equal(image, sample.image)
        rgb = np.asarray(Image.open(tmp_path / "panoptic" / ann["file_name"])).astype(np.int32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        assert np.array_equal(ids, sample.panoptic)
        sem = np.asarray(Image.open(tmp_path / "semantic" / im["file_name"]))
        assert sem.dtype == np.uint8
        for s in ann["segments_info"]:
            assert (sem[ids == s["id"]] == s["category_id"]).all()
        things = [s for s in ann["segments_info"] if synth.CATEGORIES[s["category_id"]]["isthing"]]
        records = inst_by_image.get(im["id"], [])
        assert len(records) == len(things)
        for s, a in zip(things, records):
            assert isinstance(a["segmentation"]["counts"], str)
            assert a["segmentation"]["size"] == list(size)
            decoded = mask_util.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"]})
            assert np.array_equal(decoded.astype(bool), ids == s["id"])
            assert (a["category_id"], a["area"], a["bbox"], a["iscrowd"]) == (
                s["category_id"],
                s["area"],
                s["bbox"],
                0,
            )


def test_write_dataset_is_byte_identical_and_independent_of_num_images(tmp_path):
    synth.write_dataset(tmp_path / "a", 5, seed=9)
    synth.write_dataset(tmp_path / "b", 5, seed=9)
    synth.write_dataset(tmp_path / "c", 3, seed=9)
    a, b, c = (_tree_hashes(tmp_path / n) for n in "abc")
    assert a == b
    for sub in ("images", "panoptic", "semantic"):
        for i in range(3):
            key = f"{sub}/{i:06d}.png"
            assert a[key] == c[key]
    assert "images/000003.png" not in c


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--num-images", "2", "--seed", "5", "--size", "64", "80"]) == 0
    assert "wrote 2 images of 64x80" in capsys.readouterr().out
    pan = json.loads((tmp_path / "d" / "panoptic.json").read_text())
    assert len(pan["annotations"]) == 2
    assert np.asarray(Image.open(tmp_path / "d" / "images" / "000001.png")).shape == (64, 80, 3)
