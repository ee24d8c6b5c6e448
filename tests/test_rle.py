"""COCO RLE from one id map and from column strips, against pycocotools' encode of the dense masks."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from pipeline.rle import StripRuns, decode, id_map_rles


def oracle(mask: np.ndarray) -> str:
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


@pytest.mark.parametrize("seed", range(40))
def test_id_map_rles_equal_per_mask_encode(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 40, 2))
    ids = rng.integers(0, 5, (h, w))  # noise: runs of length 1 everywhere
    if seed % 2:  # blocks: long runs, ids that start or end the image, absent ids
        ids = np.kron(rng.integers(0, 4, (h // 8 + 1, w // 8 + 1)), np.ones((8, 8), int))[:h, :w]
    wanted = list(range(-1, 6))
    for i, r in zip(wanted, id_map_rles(ids, wanted), strict=True):
        assert r["size"] == [h, w] and r["counts"] == oracle(ids == i)


@pytest.mark.parametrize("seed", range(40))
def test_strip_runs_equal_dense_encode(seed):
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(0, 5)), int(rng.integers(1, 30)), int(rng.integers(1, 30))
    masks = rng.random((n, h, w)) < rng.random()
    masks[:, :, : w // 3] = seed % 3 == 0  # runs that cross strip boundaries
    runs, c = StripRuns(n, h, w), 0
    while c < w:
        s = int(rng.integers(1, 6))
        runs.add(masks[:, :, c : c + s].transpose(0, 2, 1))  # (n, S, H): column-major
        c += s
    rles = runs.rles()
    assert [r["counts"] for r in rles] == [oracle(m) for m in masks]
    assert np.array_equal(decode(rles, (h, w)), masks)


def test_strip_runs_refuse_wrong_strips():
    runs = StripRuns(2, 4, 3)
    with pytest.raises(ValueError):
        runs.add(np.zeros((3, 1, 4), bool))
    with pytest.raises(ValueError):
        runs.add(np.zeros((2, 4, 2), bool))  # (n, H, S): not column-major
    runs.add(np.zeros((2, 2, 4), bool))
    with pytest.raises(ValueError, match="1 of|2 of"):
        runs.rles()
    with pytest.raises(ValueError):
        runs.add(np.zeros((2, 2, 4), bool))
    assert decode([], (4, 3)).shape == (0, 4, 3)
