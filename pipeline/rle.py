"""COCO RLE without dense per-segment masks: from one id map, or built column strip by column strip.

COCO RLE is column-major: a mask's pixels in the order ``mask.T.ravel()``, as alternating run lengths
that start with a run of zeros (``counts[0] == 0`` when the first pixel is set). Both builders here find
the positions where a mask changes value and turn them into run lengths; pycocotools then compresses
the lengths into its string form (``frPyObjects``), so the strings are pycocotools' own. The tests keep
``pycocotools.mask.encode`` of the dense masks as the oracle.

- :func:`id_map_rles`: every segment of an (H, W) id map (panoptic ids, semantic classes) in one
  column-major pass over the map, instead of one (H, W) boolean mask and one encode per segment.
- :class:`StripRuns`: N overlapping masks (instances) given as consecutive column strips, column-major
  (N, S, H), so that no (N, H, W) array ever exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util


def counts_to_rle(transitions: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """Sorted positions (column-major) where a mask that starts unset changes value -> COCO RLE (str counts)."""
    n = height * width
    bounds = np.concatenate(([0], np.asarray(transitions, dtype=np.int64), [n]))
    counts = np.diff(bounds).tolist()  # zeros, ones, zeros, ...; the first may be 0, the last is > 0
    rle = mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def id_map_rles(id_map: np.ndarray, ids: Sequence[int]) -> list[dict[str, Any]]:
    """The COCO RLE of ``id_map == i`` for each ``i`` in ``ids``, from one pass over the (H, W) map."""
    height, width = id_map.shape
    flat = np.ascontiguousarray(id_map.T).reshape(-1)  # (H*W,) column-major
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # (R-1,) where a run starts, past the first
    starts = np.concatenate(([0], starts))  # (R,)
    ends = np.concatenate((starts[1:], [flat.size]))  # (R,)
    values = flat[starts]  # (R,) the id of each run
    order = np.argsort(values, kind="stable")  # runs grouped by id, in position order within an id
    sorted_values = values[order]
    out = []
    for i in ids:
        lo, hi = np.searchsorted(sorted_values, [i, i + 1])  # hi: the first run past id i (integer ids)
        runs = order[lo:hi]  # (r,) this id's runs
        transitions = np.stack((starts[runs], ends[runs]), axis=1).reshape(-1)  # (2r,) set at start, unset at end
        if transitions.size and transitions[-1] == flat.size:
            transitions = transitions[:-1]  # set until the last pixel: no change at the end
        out.append(counts_to_rle(transitions, height, width))
    return out


class StripRuns:
    """Run boundaries of ``n`` masks of size ``height`` x ``width``, fed as consecutive column strips.

    ``add(columns)`` takes the next S columns as an (n, S, height) bool array (column-major: ``columns[i, c]``
    is column c of mask i, the pixel order of COCO RLE); ``rles()`` returns the n COCO RLEs once all
    ``width`` columns are in. Memory: the boundaries, plus one (n, S*height) difference per strip.
    """

    def __init__(self, n: int, height: int, width: int):
        self.n, self.height, self.width = n, height, width
        self._columns = 0
        self._last = np.zeros(n, dtype=bool)  # (n,) value of each mask's last pixel so far (start: unset)
        self._positions: list[np.ndarray] = []  # per strip: (t,) column-major positions of its boundaries
        self._bounds: list[np.ndarray] = []  # per strip: (n+1,) mask i's boundaries are positions[b[i]:b[i+1]]

    def add(self, columns: np.ndarray) -> None:
        n, s, h = columns.shape
        if n != self.n or h != self.height or self._columns + s > self.width:
            raise ValueError(
                f"columns {columns.shape} do not continue masks of {self.n} x {self.height} x {self.width} "
                "(expected (n, columns, height))"
            )
        flat = np.ascontiguousarray(columns).reshape(n, s * h)  # (n, S*H): the pixels in RLE order
        change = np.empty((n, s * h), dtype=bool)  # (n, S*H): pixel differs from the one before it
        if s * h:
            np.not_equal(flat[:, 0], self._last, out=change[:, 0])
            np.not_equal(flat[:, 1:], flat[:, :-1], out=change[:, 1:])
            self._last = flat[:, -1].copy()
        # One flat index per boundary (the 2-D np.nonzero is several times slower), by mask, then by position.
        plane, pos = np.divmod(np.flatnonzero(change), max(s * h, 1))  # (t,), (t,)
        offset = self._columns * h
        dtype = np.int32 if self.height * self.width < 2**31 else np.int64
        self._positions.append((pos + offset).astype(dtype))
        self._bounds.append(np.searchsorted(plane, np.arange(n + 1)))
        self._columns += s

    def rles(self) -> list[dict[str, Any]]:
        if self._columns != self.width and self.n > 0:  # no masks: nothing to add
            raise ValueError(f"{self._columns} of {self.width} columns were added")
        strips = list(zip(self._positions, self._bounds, strict=True))
        return [
            counts_to_rle(np.concatenate([pos[b[i] : b[i + 1]] for pos, b in strips] or [[]]), self.height, self.width)
            for i in range(self.n)
        ]


def decode(rles: list[dict[str, Any]], size: tuple[int, int]) -> np.ndarray:
    """COCO RLEs (str or bytes counts) of masks of ``size`` (H, W) -> (N, H, W) bool."""
    if not rles:
        return np.zeros((0, *size), dtype=bool)
    coded = [
        {"size": r["size"], "counts": r["counts"].encode() if isinstance(r["counts"], str) else r["counts"]}
        for r in rles
    ]
    return mask_util.decode(coded).transpose(2, 0, 1).astype(bool)
