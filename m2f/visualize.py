"""Drawing segments over an image, for ``m2f predict --overlay`` (the web page, ``service/static/overlay.js``, draws
the same picture in the browser).

Each segment is blended with its colour and outlined; its ``label score`` sits inside it, at the point farthest
from its border (the maximum of the Euclidean distance transform, the "pole of inaccessibility"), on a dark
translucent box with white text that reads on light and dark regions alike. Labels are placed one after the
other, smallest segment first; later ones keep away from the boxes already placed, so labels of overlapping
masks (instance results often hold one query's mask under several classes) do not stack.

The placement rule is implemented twice, here and in ``overlay.js``, with the same arithmetic so both give the same
point (``tests/test_web.py`` compares them):

- crop the mask to its bounding box; when its longer side is over ``POLE_GRID`` pixels, look on a coarse grid
  of ``s x s`` blocks (``s = ceil(side / POLE_GRID)``), a block counting only if all its pixels are in the mask
  (the answer is that block's centre pixel); a mask with no full block is searched at full resolution;
- squared distance of each pixel to the nearest pixel outside the mask (the image border counts as outside):
  exact, a 1-D pass down the columns then Felzenszwalb & Huttenlocher's lower envelope of parabolas along the
  rows;
- among the pixels at the largest distance, the one nearest to their mean position (a rectangle's label sits
  at its centre, not at the first pixel of its medial ridge), the first in row-major order on ties.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_util

POLE_GRID = 256  # longest side searched at full resolution; larger masks are searched on a coarse grid
LABEL_PAD = 2  # pixels between the text and the edge of its box
BOX_ALPHA = 0.65  # opacity of the dark box behind a label: white text keeps a contrast of 7:1 over pure white


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 well-separated colours (golden-ratio hues)."""
    hues = (np.arange(n) * 0.618034) % 1.0
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- distance
def column_distance(fg: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) int64 distance along each column to the nearest False pixel (every column must hold
    one, e.g. a padded mask)."""
    h, w = fg.shape
    rows = np.arange(h)[:, None]  # (H, 1)
    far = h + w + 1
    above = np.maximum.accumulate(np.where(fg, -far, rows), axis=0)  # (H, W) last background row at or above
    below = np.minimum.accumulate(np.where(fg, 2 * far, rows)[::-1], axis=0)[::-1]  # first at or below
    return np.minimum(rows - above, below - rows).astype(np.int64)


def lower_envelope(f: np.ndarray) -> np.ndarray:
    """``d[r, x] = min_q (x - q)^2 + f[r, q]`` for (R, W) int64 ``f``: the 1-D squared-distance transform of
    Felzenszwalb & Huttenlocher (2012), run on all rows at once (the Python loop goes along the W axis)."""
    r, w = f.shape
    base = np.arange(r) * w  # flat index of each row's first element
    zbase = np.arange(r) * (w + 1)
    fq2 = (f + np.arange(w) ** 2).ravel().astype(np.float64)  # (R*W,) f(q) + q^2
    v = np.zeros(r * w, np.int64)  # per row: vertices of the parabolas in the envelope, v[0..k]
    z = np.empty(r * (w + 1))  # per row: z[i], z[i+1] bound where parabola v[i] is the lowest
    z[zbase], z[zbase + 1] = -np.inf, np.inf
    k = np.zeros(r, np.int64)  # (R,) index of the last parabola per row
    for q in range(1, w):
        col = fq2[base + q]
        while True:  # pop the parabolas that q's hides, in every row that has one to pop
            vk = v[base + k]
            s = (col - fq2[base + vk]) / (2 * (q - vk))  # (R,) where parabola q crosses parabola v[k]
            pop = s <= z[zbase + k]
            if not pop.any():
                break
            k -= pop
        k += 1
        v[base + k] = q
        z[zbase + k] = s
        z[zbase + k + 1] = np.inf
    d = np.empty_like(f)
    k[:] = 0
    flat = f.ravel()
    for x in range(w):
        while (step := z[zbase + k + 1] < x).any():
            k += step
        vk = v[base + k]
        d[:, x] = (x - vk) ** 2 + flat[base + vk]
    return d


def squared_distance(fg: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) int64 exact squared Euclidean distance of each True pixel to the nearest False
    one (0 on False pixels). Pixels outside the array count as False."""
    fg = np.pad(fg, 1)
    transpose = fg.shape[1] > fg.shape[0]  # the envelope's loop runs along axis 1: make it the shorter side
    if transpose:
        fg = fg.T
    g = column_distance(fg)  # (H+2, W+2)
    d = lower_envelope(g * g)
    return (d.T if transpose else d)[1:-1, 1:-1]


# ---------------------------------------------------------------------------------------------- placement
def _pole_exact(fg: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of non-empty ``fg`` farthest from its border; ties: nearest to the mean of the tied
    pixels, then first in row-major order."""
    d = squared_distance(fg)
    ys, xs = np.nonzero(d == d.max())
    cy, cx = ys.sum() / len(ys), xs.sum() / len(xs)
    i = int(np.argmin((xs - cx) * (xs - cx) + (ys - cy) * (ys - cy)))
    return int(xs[i]), int(ys[i])


def pole(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) inside ``mask`` (H, W) bool farthest from its border: where its label goes (see the module doc)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty mask has no label point")
    y0, x0 = int(ys.min()), int(xs.min())
    crop = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]  # (h, w)
    h, w = crop.shape
    s = math.ceil(max(h, w) / POLE_GRID)
    if s > 1:
        padded = np.zeros((math.ceil(h / s) * s, math.ceil(w / s) * s), bool)
        padded[:h, :w] = crop
        blocks = padded.reshape(padded.shape[0] // s, s, padded.shape[1] // s, s).all(axis=(1, 3))  # (h/s, w/s)
        if blocks.any():
            bx, by = _pole_exact(blocks)
            return x0 + bx * s + (s - 1) // 2, y0 + by * s + (s - 1) // 2
    x, y = _pole_exact(crop)
    return x0 + x, y0 + y


@dataclass(frozen=True)
class LabelPlace:
    """Where a label goes: the point ``(x, y)`` inside its mask and the ``box`` ``(left, top, right, bottom)``
    (right/bottom exclusive) drawn around it."""

    x: int
    y: int
    box: tuple[int, int, int, int]


def place_labels(masks: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[LabelPlace]:
    """Places for labels of ``sizes`` (w, h) on ``masks`` ((H, W) bool each, non-empty).

    Smallest mask first, each label goes to the pole of what of its mask is not yet under a placed box nor at a
    point already taken; if nothing is left, to the pole of the part not at a taken point, else of the whole
    mask. Its box is centred on that point, moved into the image where it would stick out.
    """
    if not masks:
        return []
    height, width = masks[0].shape
    occupied = np.zeros((height, width), bool)  # under a placed box
    taken = np.zeros((height, width), bool)  # label points already used
    places: list[LabelPlace | None] = [None] * len(masks)
    areas = [int(m.sum()) for m in masks]
    for i in sorted(range(len(masks)), key=lambda i: (areas[i], i)):
        mask = masks[i]
        region = next((r for r in (mask & ~occupied & ~taken, mask & ~taken) if r.any()), mask)
        x, y = pole(region)
        w, h = sizes[i]
        left = min(max(x - w // 2, 0), max(width - w, 0))
        top = min(max(y - h // 2, 0), max(height - h, 0))
        places[i] = LabelPlace(x, y, (left, top, left + w, top + h))
        occupied[top : top + h, left : left + w] = True
        taken[y, x] = True
    return places


# ---------------------------------------------------------------------------------------------- drawing
def blend_segments(image: np.ndarray, masks: list[np.ndarray], colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 ``image`` with each mask filled with ``alpha`` of its colour and outlined in it (pixels
    with a 4-neighbour outside the mask; the image edge is not a border); later masks are drawn over earlier
    ones. Each mask is worked on within its bounding box grown by one pixel."""
    base = image.astype(np.float32)
    out = base.copy()
    height, width = image.shape[:2]
    for full, colour in zip(masks, colours, strict=False):
        rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
        if len(rows) == 0:
            continue
        box = (
            slice(max(rows[0] - 1, 0), min(rows[-1] + 2, height)),
            slice(max(cols[0] - 1, 0), min(cols[-1] + 2, width)),
        )
        mask, crop = full[box], out[box]  # (h, w), (h, w, 3) views
        crop[mask] = (1 - alpha) * base[box][mask] + alpha * colour
        inner = mask.copy()  # outline = mask minus its 4-neighbour erosion
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        crop[mask & ~inner] = colour
    return out.clip(0, 255).astype(np.uint8)


def label_text(segment: dict) -> str:
    return f"{segment['label']} {segment['score']:.2f}" if segment.get("score") is not None else segment["label"]


def label_font(width: int, height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's scalable default font at a size that grows with the image (10-28 px)."""
    size = min(max(round(min(width, height) / 25), 10), 28)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def drawing_order(segments: list[dict]) -> list[int]:
    """Indices of ``segments`` by score, lowest first (stable; no score counts as lowest): the best instance
    masks and labels end up on top."""
    return sorted(
        range(len(segments)), key=lambda i: -math.inf if segments[i].get("score") is None else segments[i]["score"]
    )


def draw_overlay(image: Image.Image, segments: list[dict], alpha: float = 0.5) -> Image.Image:
    """Blend each segment's colour over ``image`` with its outline and ``label score`` inside it (see the module
    doc). ``segments`` are JSON records as ``m2f predict`` writes them (COCO RLE ``segmentation``); segment ``i``
    gets ``palette(n)[i]``, and they are drawn in :func:`drawing_order`."""
    rgb = np.asarray(image.convert("RGB"))
    masks = [mask_util.decode(seg["segmentation"]).astype(bool) for seg in segments]  # (H, W) each
    colours = palette(max(len(segments), 1))
    order = drawing_order(segments)
    result = Image.fromarray(blend_segments(rgb, [masks[i] for i in order], colours[order], alpha))
    shown = [i for i in order if masks[i].any()]
    if not shown:
        return result
    font = label_font(*result.size)
    draw = ImageDraw.Draw(result)
    texts = [label_text(segments[i]) for i in shown]
    extents = [draw.textbbox((0, 0), t, font=font) for t in texts]  # (l, t, r, b) relative to the anchor
    sizes = [(r - lf + 2 * LABEL_PAD + 3, b - t + 2 * LABEL_PAD) for lf, t, r, b in extents]  # +3: colour bar
    places = place_labels([masks[i] for i in shown], sizes)
    for i, text, (lf, t, _, _), place in zip(shown, texts, extents, places, strict=True):
        left, top, right, bottom = place.box
        size = (right - left, bottom - top)
        shade = Image.new("L", size, round(255 * BOX_ALPHA))
        result.paste(Image.new("RGB", size), (left, top), shade)  # a translucent dark box
        draw.rectangle((left, top, left + 2, bottom - 1), fill=tuple(int(c) for c in colours[i]))  # colour bar
        draw.text((left + 3 + LABEL_PAD - lf, top + LABEL_PAD - t), text, fill=(255, 255, 255), font=font)
    return result
