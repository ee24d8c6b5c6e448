"""Overlays: the distance transform, where labels go, and that they can be read (``m2f.visualize``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from m2f import visualize
from pipeline.encoding import segment_records


# ---------------------------------------------------------------------------------------------- shapes
def disk(h: int, w: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= r * r


def ring(h: int, w: int, outer: float, inner: float) -> np.ndarray:
    return disk(h, w, outer) & ~disk(h, w, inner)


def u_shape(h: int, w: int) -> np.ndarray:
    """A U: two arms joined at the bottom; its centre (and its bounding box's centre) is outside it."""
    m = np.zeros((h, w), bool)
    m[h // 6 :, w // 10 : w // 3] = True
    m[h // 6 :, 2 * w // 3 : 9 * w // 10] = True
    m[-h // 4 :, w // 10 : 9 * w // 10] = True
    return m


def l_shape(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[5:-5, 5:15] = True
    m[-15:-5, 5:-5] = True
    return m


def rectangle(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[top:bottom, left:right] = True
    return m


def edt(mask: np.ndarray) -> np.ndarray:
    """The reference: scipy's exact Euclidean distance transform, outside the array counting as background."""
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


SHAPES = {
    "disk": disk(41, 50, 15),
    "rectangle": rectangle(30, 60, 5, 8, 21, 52),
    "line": rectangle(20, 30, 7, 2, 8, 28),
    "u": u_shape(50, 70),
    "ring": ring(60, 60, 25, 12),
    "thin ring": ring(60, 60, 20, 19),
    "l": l_shape(60, 60),
    "one pixel": rectangle(9, 9, 8, 0, 9, 1),
    "two pixels": rectangle(9, 9, 4, 4, 5, 6),
    "at the border": rectangle(30, 40, 0, 0, 30, 12),
    "large ring": ring(700, 640, 300, 200),  # over POLE_GRID: the coarse grid
    "large stripes": np.indices((40, 600))[0] % 2 == 0,  # no full coarse block: full resolution
}


# ---------------------------------------------------------------------------------------------- distance
def test_squared_distance_is_exact():
    rng = np.random.default_rng(0)
    masks = [rng.random(rng.integers(1, 40, size=2)) < rng.random() for _ in range(60)]
    masks += list(SHAPES.values())[:-2]
    for mask in masks:
        np.testing.assert_array_equal(
            visualize.squared_distance(mask), np.rint(edt(mask) ** 2), err_msg=str(mask.shape)
        )


def test_lower_envelope_is_the_min_over_parabolas():
    rng = np.random.default_rng(1)
    f = rng.integers(0, 400, size=(5, 33)).astype(np.int64)
    f[0] = 0
    f[1, ::7] = 10_000
    q = np.arange(33)
    want = np.min((q[:, None] - q[None, :]) ** 2 + f[:, None, :], axis=2)  # (R, x)
    np.testing.assert_array_equal(visualize.lower_envelope(f), want)


# ---------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("name", SHAPES)
def test_label_point_lies_inside_its_segment(name):
    mask = SHAPES[name]
    x, y = visualize.pole(mask)
    assert mask[y, x], f"{name}: {x, y} outside"


@pytest.mark.parametrize("name", ["disk", "rectangle", "u", "ring", "l", "at the border", "two pixels"])
def test_label_point_is_farthest_from_the_border(name):
    mask = SHAPES[name]
    x, y = visualize.pole(mask)
    d = edt(mask)
    assert d[y, x] == d.max()


def test_label_point_of_symmetric_shapes_is_central():
    assert visualize.pole(SHAPES["disk"]) == (24, 20)  # the disk's centre (24.5, 20): ties -> row-major first
    assert visualize.pole(SHAPES["rectangle"]) == (29, 12)  # rows 5..20, columns 8..51: the medial ridge's middle
    ys, xs = np.nonzero(SHAPES["u"])
    x, y = visualize.pole(SHAPES["u"])
    assert abs(x - xs.mean()) > 5, "a U's label is in an arm or the base, not at its (empty) centre"


def test_coarse_grid_stays_near_the_exact_point():
    mask = SHAPES["large ring"]
    s = math.ceil(max(np.ptp(np.nonzero(mask), axis=1) + 1) / visualize.POLE_GRID)
    x, y = visualize.pole(mask)
    d = edt(mask)
    assert d[y, x] >= d.max() - 2 * s, "within two coarse blocks of the best distance"


def test_empty_mask_has_no_label_point():
    with pytest.raises(ValueError, match="empty"):
        visualize.pole(np.zeros((4, 4), bool))


def test_labels_of_distinct_segments_are_distinct_points():
    h, w = 60, 80
    u = u_shape(h, w)
    ring_mask = ring(h, w, 14, 7)  # inside the U's hollow? no matter: may overlap, labels must still differ
    tiny = rectangle(h, w, 2, 2, 3, 3)
    dup = u.copy()  # instance results hold one query's mask under several classes
    masks = [u, ring_mask, tiny, dup, dup.copy()]
    places = visualize.place_labels(masks, [(20, 8)] * len(masks))
    points = [(p.x, p.y) for p in places]
    assert len(set(points)) == len(points), points
    for (x, y), mask, p in zip(points, masks, places):
        assert mask[y, x]
        left, top, right, bottom = p.box
        assert 0 <= left < right <= w and 0 <= top < bottom <= h and (right - left, bottom - top) == (20, 8)


def test_later_labels_keep_clear_of_placed_boxes():
    big = rectangle(40, 100, 0, 0, 40, 100)
    small = rectangle(40, 100, 15, 45, 25, 55)  # in the middle of the big one: its label goes first
    places = visualize.place_labels([big, small], [(16, 8), (16, 8)])
    bl, bt, br, bb = places[0].box
    sl, st, sr, sb = places[1].box
    assert (places[1].x, places[1].y) == visualize.pole(small)
    assert br <= sl or sr <= bl or bb <= st or sb <= bt, "the big segment's label avoids the small one's box"


def test_drawing_order_puts_the_best_on_top():
    segs = [{"score": 0.9}, {"score": None}, {"score": 0.1}, {"score": 0.9}, {"score": None}]
    assert visualize.drawing_order(segs) == [1, 4, 2, 0, 3]


# ---------------------------------------------------------------------------------------------- drawing
def overlay_and_labels(image: Image.Image, masks: list[np.ndarray], scores: list[float]):
    """draw_overlay's output, and where it differs from the blended masks alone (the label boxes)."""
    segs = segment_records(np.stack(masks), list(range(len(masks))), scores, {0: "ring", 1: "u", 2: "dot"}, set())
    out = np.asarray(visualize.draw_overlay(image, segs))
    order = visualize.drawing_order(segs)
    blended = visualize.blend_segments(
        np.asarray(image), [masks[i] for i in order], visualize.palette(len(segs))[order]
    )
    return out, np.any(out != blended, axis=-1)


def components(mask: np.ndarray) -> list[tuple[slice, slice]]:
    labels, _ = ndimage.label(mask)
    return ndimage.find_objects(labels)


def test_overlay_labels_sit_inside_not_at_the_corner():
    h, w = 200, 240
    masks = [ring(h, w, 90, 55), u_shape(h, w) & ~disk(h, w, 90), rectangle(h, w, 2, 2, 5, 5)]
    image = Image.new("RGB", (w, h), (120, 130, 140))
    _, changed = overlay_and_labels(image, masks, [0.9, 0.8, 0.7])
    boxes = components(changed)
    assert len(boxes) == 3, "one box per label, none stacked on another"
    for mask in masks:
        x, y = visualize.pole(mask)
        ys, xs = np.nonzero(mask)
        box = next(b for b in boxes if b[0].start <= y < b[0].stop and b[1].start <= x < b[1].stop)
        if mask.sum() > 100:  # the label fits: it covers its point, not the corner of the bounding box
            assert not (box[0].start <= ys.min() < box[0].stop and box[1].start <= xs.min() < box[1].stop)


def relative_luminance(rgb: np.ndarray) -> float:
    c = rgb / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ [0.2126, 0.7152, 0.0722])


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (250, 240, 80)])
def test_overlay_labels_read_on_light_and_dark_regions(background):
    h, w = 90, 160
    mask = rectangle(h, w, 10, 10, 80, 150)
    out, changed = overlay_and_labels(Image.new("RGB", (w, h), background), [mask], [0.5])
    (box,) = components(changed)
    pixels = out[box].reshape(-1, 3)
    values, counts = np.unique(pixels, axis=0, return_counts=True)
    backdrop = values[np.argmax(counts)]  # the box's own colour, most of its pixels
    text = pixels[np.argmax(pixels.sum(axis=1))]
    lighter, darker = sorted([relative_luminance(text), relative_luminance(backdrop)], reverse=True)
    assert (lighter + 0.05) / (darker + 0.05) >= 4.5, f"contrast text {text} on {backdrop}"


def test_overlay_without_segments_is_the_image():
    image = Image.new("RGB", (20, 10), (1, 2, 3))
    assert np.array_equal(np.asarray(visualize.draw_overlay(image, [])), np.asarray(image))


def test_blend_fills_and_outlines():
    image = np.full((6, 7, 3), 100, np.uint8)
    block = rectangle(6, 7, 1, 1, 4, 4)  # rows 1..3, columns 1..3: one inner pixel at (2, 2)
    edge = rectangle(6, 7, 0, 5, 6, 7)  # the two right columns, touching the image's top, right and bottom
    colours = np.array([[200, 0, 50], [10, 20, 30]], np.uint8)
    out = visualize.blend_segments(image, [block, edge], colours)
    assert out[2, 2].tolist() == [150, 50, 75], "inside: half the colour over the image"
    assert all(out[y, x].tolist() == [200, 0, 50] for y in (1, 3) for x in (1, 2, 3)), "the block's outline"
    assert out[2, 6].tolist() == [55, 60, 65], "the image edge is not an outline"
    assert out[2, 5].tolist() == [10, 20, 30], "a border with the rest of the image is"
    assert (out[~(block | edge)] == 100).all()
