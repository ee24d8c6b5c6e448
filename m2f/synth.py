"""A deterministic synthetic panoptic dataset: textured shapes over wavy stuff bands.

Nothing can be downloaded where the demo model is trained, so it learns from images made here. Each
image is 2-3 horizontal stuff bands ("sky", "ground", "water") with wavy boundaries, each with a
class-typical colour and texture, and 1-6 things ("circle", "square", "triangle", "ring", "cross") of
any colour and a per-instance texture, so a thing's class is told by its shape alone.

Generation rules (sizes in pixels at the default 160x160; they scale with the shorter image side):

- Stuff: a layout of 2-3 bands is drawn from ``_LAYOUTS`` (each stuff class at most once); band
  boundaries are sums of two sinusoids plus smooth roughness. Every pixel not covered by a thing is
  stuff, so there is no void. A stuff class whose visible area ends up under ``MIN_AREA`` is merged
  into its neighbouring band *before* rendering (image and labels agree).
- Things: 1-6 are placed, drawn bottom to top (later ones occlude earlier ones). The size ``d`` (circle
  and ring diameter, cross extent; square side 0.78 d; triangle circumradius 0.6 d) is uniform in
  [14, 0.45 * side]; centres lie in the middle 80 % of the image, so shapes may be cut by the border.
  Visibility is resolved top down: an instance whose visible pixels number fewer than ``MIN_AREA`` or
  fewer than ``MIN_VISIBLE_FRACTION`` of its full geometric area is dropped and NOT drawn (so it
  occludes nothing); the instances below it are judged without it.
- Masks are exact: shapes are rasterised by a per-pixel-centre inside test with no anti-aliasing, and
  the image is painted with those same masks. A ring's hole shows what lies beneath it.
- Thing colours are any hue (saturation and value >= 0.45), chosen to stand at least a fixed RGB
  distance from the stuff colours of the image and the earlier things where possible. Textures are
  flat, noise, gradient or (only for things of at least twice the minimum size) stripes.

Every sample depends only on ``(seed, index, size)`` through ``np.random.default_rng([seed, index])``.
``write_dataset`` writes COCO panoptic PNGs + JSON, COCO instance JSON (things, RLE) and semantic PNGs.
"""

from __future__ import annotations

import colorsys
import json
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

Size = tuple[int, int]

CATEGORIES: list[dict] = [
    {"id": 0, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
    {"id": 1, "name": "square", "isthing": 1, "color": [0, 130, 200]},
    {"id": 2, "name": "triangle", "isthing": 1, "color": [60, 180, 75]},
    {"id": 3, "name": "ring", "isthing": 1, "color": [255, 225, 25]},
    {"id": 4, "name": "cross", "isthing": 1, "color": [145, 30, 180]},
    {"id": 5, "name": "sky", "isthing": 0, "color": [135, 206, 235]},
    {"id": 6, "name": "ground", "isthing": 0, "color": [139, 105, 60]},
    {"id": 7, "name": "water", "isthing": 0, "color": [30, 80, 140]},
]
CIRCLE, SQUARE, TRIANGLE, RING, CROSS, SKY, GROUND, WATER = range(8)
THING_IDS = (CIRCLE, SQUARE, TRIANGLE, RING, CROSS)
STUFF_IDS = (SKY, GROUND, WATER)

REFERENCE_SIDE = 160  # the side at which the pixel constants below hold; they scale with the image
MIN_AREA = 64  # visible pixels a segment needs at 160x160 (scaled by image area)
MIN_VISIBLE_FRACTION = 0.35  # of a thing's full geometric area that must stay visible
MIN_THING_SIZE = 14  # smallest thing size d at 160 px
MAX_THING_SIZE_FRACTION = 0.45  # largest d, as a fraction of the shorter side
MAX_THINGS = 6
_MIN_COLOUR_DISTANCE = 90.0  # RGB distance a thing colour tries to keep from stuff and earlier things
_LAYOUTS = (  # stuff bands, top to bottom
    (SKY, GROUND),
    (SKY, WATER),
    (SKY, WATER, GROUND),
    (SKY, GROUND, WATER),
    (GROUND, WATER),
    (WATER, GROUND),
)
_THING_TEXTURES = ("flat", "stripes", "noise", "gradient")
_SMALL_THING_TEXTURES = ("flat", "noise", "gradient")  # for things under twice the minimum size


class Sample(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8 RGB
    panoptic: np.ndarray  # (H, W) int32 segment ids; 0 = void (unlabelled)
    segments: list[dict]  # COCO panoptic segments_info


def min_area(size: Size = (REFERENCE_SIDE, REFERENCE_SIDE)) -> int:
    """Visible pixels every segment of a ``size`` image has (``MIN_AREA`` scaled by image area, >= it)."""
    h, w = size
    return max(MIN_AREA, round(MIN_AREA * h * w / REFERENCE_SIDE**2))


# ---------------------------------------------------------------------------------------------- helpers


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """(3,) float32 RGB in 0..255."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _smooth_noise(rng: np.random.Generator, shape: Size, cells: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 smooth noise, about N(0, 1): a (cy+1, cx+1) random grid upsampled bilinearly."""
    h, w = shape
    cy, cx = cells
    grid = rng.standard_normal((cy + 1, cx + 1)).astype(np.float32)
    ys = np.linspace(0.0, cy, h, dtype=np.float32)
    xs = np.linspace(0.0, cx, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), cy - 1)
    x0 = np.minimum(xs.astype(np.int64), cx - 1)
    fy = (ys - y0)[:, None]  # (H, 1)
    fx = (xs - x0)[None, :]  # (1, W)
    g00 = grid[y0][:, x0]  # (H, W)
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx).astype(np.float32)


def _bbox(mask: np.ndarray) -> list[int]:
    """Tight ``[x, y, w, h]`` of a non-empty (H, W) bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


# ---------------------------------------------------------------------------------------------- stuff


def _boundary(rng: np.random.Generator, w: int, h: int, base: float) -> np.ndarray:
    """(W,) float32 row of a wavy band boundary: two sinusoids plus smooth roughness around ``base``."""
    x = np.arange(w, dtype=np.float32) + 0.5
    amp = rng.uniform(0.02, 0.07) * h
    y = np.full(w, base, dtype=np.float32)
    for period, scale in (
        (rng.uniform(0.6, 2.0) * w, rng.uniform(0.4, 1.0)),
        (rng.uniform(0.12, 0.35) * w, rng.uniform(0.1, 0.35)),
    ):
        y += amp * scale * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
    y += _smooth_noise(rng, (1, w), (1, max(2, w // 10)))[0] * 0.012 * h
    return y


def _stuff_bands(rng: np.random.Generator, size: Size) -> tuple[tuple[int, ...], np.ndarray]:
    """The layout (stuff classes top to bottom) and an (H, W) int64 map of band indices into it."""
    h, w = size
    layout = _LAYOUTS[rng.integers(len(_LAYOUTS))]
    if len(layout) == 2:
        bounds = [_boundary(rng, w, h, rng.uniform(0.35, 0.65) * h)]
    else:
        upper = _boundary(rng, w, h, rng.uniform(0.25, 0.42) * h)
        lower = np.maximum(_boundary(rng, w, h, rng.uniform(0.58, 0.78) * h), upper + 0.12 * h)
        bounds = [upper, lower]
    y = np.arange(h, dtype=np.float32)[:, None] + 0.5  # (H, 1) pixel centres
    band = np.zeros((h, w), dtype=np.int64)
    for b in bounds:
        band += y >= b[None, :]
    return layout, band


def _stuff_colours(rng: np.random.Generator, cls: int) -> np.ndarray:
    """(2, 3) float32: a stuff class's main colour and, for ground, the second colour of its blotches."""
    main = _stuff_colour(rng, cls)
    return np.stack([main, _stuff_colour(rng, cls) if cls == GROUND else main])


def _stuff_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    if cls == SKY:  # bluish to greyish
        return _hsv(rng.uniform(0.53, 0.66), rng.uniform(0.08, 0.6), rng.uniform(0.72, 1.0))
    if cls == WATER:  # darker blue/teal/green
        return _hsv(rng.uniform(0.42, 0.64), rng.uniform(0.4, 0.85), rng.uniform(0.28, 0.58))
    return _hsv(rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.8), rng.uniform(0.3, 0.62))  # ground: brown/green


def _stuff_texture(rng: np.random.Generator, cls: int, colours: np.ndarray, size: Size) -> np.ndarray:
    """(H, W, 3) float32 texture of a stuff class with (2, 3) ``colours`` over the whole image (cut to its band later)."""
    colour, other = colours
    h, w = size
    y = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h  # (H, 1) in 0..1
    x = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w  # (1, W)
    if cls == SKY:  # darker at the top, lighter towards the horizon, soft clouds
        shade = 0.82 + rng.uniform(0.2, 0.35) * y  # (H, 1)
        clouds = np.clip(_smooth_noise(rng, size, (4, 5)), 0, None)[..., None] * rng.uniform(10, 35)
        return colour * shade[..., None] + clouds
    if cls == WATER:  # horizontal ripples whose phase wanders along x, darker further down
        period = rng.uniform(3.0, 7.0) / h
        wander = rng.uniform(0.5, 1.5) * np.sin(2 * np.pi * x * rng.uniform(1.0, 4.0) + rng.uniform(0, 2 * np.pi))
        ripple = np.sin(2 * np.pi * y / period + wander) * rng.uniform(8, 20)  # (H, W)
        shade = 1.05 - rng.uniform(0.1, 0.3) * y
        return colour * shade[..., None] + ripple[..., None]
    # ground: blotches blending towards a second earthy colour, plus per-pixel grain
    mix = np.clip(0.5 + 0.35 * _smooth_noise(rng, size, (8, 8)), 0, 1)[..., None]
    grain = rng.normal(0.0, rng.uniform(6, 14), size=(h, w, 1)).astype(np.float32)
    return colour * (1 - mix) + other * mix + grain


# ---------------------------------------------------------------------------------------------- things


class _Thing(NamedTuple):
    cls: int
    mask: np.ndarray  # (H, W) bool, the full shape inside the image
    area: float  # geometric area, including any part outside the image
    colour: np.ndarray  # (3,) float32
    texture: str
    rng_seed: int  # for the texture, drawn only if the thing is drawn


def _shape(rng: np.random.Generator, cls: int, size: Size, d: float) -> tuple[np.ndarray, float]:
    """Rasterise a thing of class ``cls`` and size ``d``: (H, W) bool mask and its geometric area."""
    h, w = size
    cy = rng.uniform(0.1, 0.9) * h
    cx = rng.uniform(0.1, 0.9) * w
    theta = rng.uniform(0, 2 * np.pi)
    reach = 0.62 * d + 1  # every shape lies within this distance of its centre
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy  # (h', 1) pixel centres
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx  # (1, w')
    u = dx * np.cos(theta) + dy * np.sin(theta)  # (h', w') rotated coordinates
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if cls == CIRCLE:
        r = d / 2
        inside, area = u * u + v * v <= r * r, np.pi * r * r
    elif cls == SQUARE:
        half = 0.39 * d
        inside, area = np.maximum(np.abs(u), np.abs(v)) <= half, (2 * half) ** 2
    elif cls == TRIANGLE:  # equilateral: three half-planes at the inradius R/2
        big_r = 0.6 * d
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= big_r / 2
        area = 3 * np.sqrt(3) / 4 * big_r**2
    elif cls == RING:
        r_out = d / 2
        r_in = r_out * rng.uniform(0.45, 0.62)
        rr = u * u + v * v
        inside, area = (rr <= r_out**2) & (rr >= r_in**2), np.pi * (r_out**2 - r_in**2)
    else:  # CROSS: two bars of full length d
        half_w = d * rng.uniform(0.14, 0.2)
        au, av = np.abs(u), np.abs(v)
        inside = ((au <= d / 2) & (av <= half_w)) | ((av <= d / 2) & (au <= half_w))
        area = 2 * d * 2 * half_w - (2 * half_w) ** 2
    mask = np.zeros(size, dtype=bool)
    mask[y0:y1, x0:x1] = inside
    return mask, float(area)


def _thing_colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """A saturated colour of any hue, the first of up to 16 tries far enough from ``avoid`` (else the farthest)."""
    best, best_dist = None, -1.0
    for _ in range(16):
        c = _hsv(rng.uniform(0, 1), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
        dist = min((float(np.linalg.norm(c - a)) for a in avoid), default=np.inf)
        if dist > best_dist:
            best, best_dist = c, dist
        if dist >= _MIN_COLOUR_DISTANCE:
            break
    return best


def _paint_thing(image: np.ndarray, thing: _Thing) -> None:
    """Paint ``thing`` with its texture over its mask (in place; exact, no anti-aliasing)."""
    rng = np.random.default_rng(thing.rng_seed)
    ys, xs = np.nonzero(thing.mask)
    yf, xf = ys.astype(np.float32), xs.astype(np.float32)
    c = thing.colour
    if thing.texture == "flat":
        pix = np.broadcast_to(c, (len(ys), 3))
    elif thing.texture == "stripes":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(4.0, 9.0)
        on = (((xf * np.cos(a) + yf * np.sin(a)) / period) % 1.0) < 0.5
        alt = c * rng.uniform(0.5, 0.7) if c.max() > 150 else np.minimum(c * 1.5 + 40, 255)
        pix = np.where(on[:, None], c, alt)
    elif thing.texture == "noise":
        pix = c + rng.normal(0.0, rng.uniform(8, 18), size=(len(ys), 1)).astype(np.float32)
    else:  # gradient along a random direction across the shape
        a = rng.uniform(0, 2 * np.pi)
        t = xf * np.cos(a) + yf * np.sin(a)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        pix = c * (0.7 + 0.5 * t)[:, None]
    image[ys, xs] = pix


# ---------------------------------------------------------------------------------------------- samples


def make_sample(seed: int, index: int, size: Size = (REFERENCE_SIDE, REFERENCE_SIDE)) -> Sample:
    """Sample ``index`` of the dataset ``seed`` at ``size`` = (H, W); depends on nothing else."""
    h, w = int(size[0]), int(size[1])
    size = (h, w)
    rng = np.random.default_rng([seed, index])
    side = min(h, w)
    floor_area = min_area(size)

    layout, band = _stuff_bands(rng, size)
    stuff_colours = [_stuff_colours(rng, cls) for cls in layout]  # (2, 3) each

    # Place things bottom to top, then resolve visibility top down (a dropped thing occludes nothing).
    d_min = max(MIN_THING_SIZE, MIN_THING_SIZE * side / REFERENCE_SIDE)
    d_max = max(d_min, MAX_THING_SIZE_FRACTION * side)
    placed: list[_Thing] = []
    for _ in range(int(rng.integers(1, MAX_THINGS + 1))):
        cls = int(rng.choice(THING_IDS))
        d = float(rng.uniform(d_min, d_max))
        mask, area = _shape(rng, cls, size, d)
        colour = _thing_colour(rng, [c for pair in stuff_colours for c in pair] + [t.colour for t in placed])
        textures = _THING_TEXTURES if d >= 2 * d_min else _SMALL_THING_TEXTURES  # stripes break up small shapes
        texture = textures[rng.integers(len(textures))]
        placed.append(_Thing(cls, mask, area, colour, texture, int(rng.integers(2**63))))
    covered = np.zeros(size, dtype=bool)
    kept: list[tuple[_Thing, np.ndarray]] = []  # (thing, visible mask), top first
    for thing in reversed(placed):
        visible = thing.mask & ~covered
        n = int(visible.sum())
        if n >= floor_area and n >= MIN_VISIBLE_FRACTION * thing.area:
            kept.append((thing, visible))
            covered |= thing.mask
    kept.reverse()  # bottom first, the drawing order

    # A stuff band left with too few visible pixels is merged into its neighbour before rendering.
    present = [j for j in range(len(layout)) if (band == j).any()]
    while len(present) > 1:
        visible_stuff = np.bincount(band[~covered], minlength=len(layout))  # (len(layout),)
        small = [j for j in present if visible_stuff[j] < floor_area]
        if not small:
            break
        j = small[0]
        present.remove(j)
        band[band == j] = max((k for k in present if k < j), default=min(present))
    # Render: stuff textures cut to their bands, then things bottom to top with their full masks.
    image = np.zeros((h, w, 3), dtype=np.float32)
    for j in present:
        texture = _stuff_texture(rng, layout[j], stuff_colours[j], size)
        sel = band == j
        image[sel] = texture[sel]
    for thing, _ in kept:
        _paint_thing(image, thing)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    panoptic = np.zeros((h, w), dtype=np.int32)
    segments: list[dict] = []
    for j in present:  # stuff first, top to bottom
        mask = (band == j) & ~covered
        seg_id = len(segments) + 1
        panoptic[mask] = seg_id
        segments.append(_segment(seg_id, layout[j], mask))
    for thing, visible in kept:
        seg_id = len(segments) + 1
        panoptic[visible] = seg_id
        segments.append(_segment(seg_id, thing.cls, visible))
    return Sample(image, panoptic, segments)


def _segment(seg_id: int, category_id: int, mask: np.ndarray) -> dict:
    return {"id": seg_id, "category_id": int(category_id), "iscrowd": 0, "bbox": _bbox(mask), "area": int(mask.sum())}


def semantic_map(sample: Sample) -> np.ndarray:
    """(H, W) uint8 category id of every pixel's segment; 255 where void."""
    lut = np.full(max(s["id"] for s in sample.segments) + 1, 255, dtype=np.uint8)
    for s in sample.segments:
        lut[s["id"]] = s["category_id"]
    return lut[sample.panoptic]


def panoptic_png(panoptic: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic encoding of an id map: id = R + 256 * G + 256^2 * B."""
    ids = panoptic.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- dataset


def _dump_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")


def write_dataset(out: str | Path, num_images: int, seed: int, size: Size = (REFERENCE_SIDE, REFERENCE_SIDE)) -> None:
    """Write ``num_images`` samples of dataset ``seed`` under ``out`` in COCO formats.

    ``images/*.png`` (RGB), ``panoptic/*.png`` + ``panoptic.json`` (COCO panoptic), ``instances.json``
    (COCO instances for things, RLE masks), ``semantic/*.png`` (category id, 255 = void). Image ids are
    the sample indices. The bytes depend only on the arguments.
    """
    out = Path(out)
    h, w = int(size[0]), int(size[1])
    for sub in ("images", "panoptic", "semantic"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    images, pan_annotations, inst_annotations = [], [], []
    for index in range(num_images):
        sample = make_sample(seed, index, (h, w))
        name = f"{index:06d}.png"
        Image.fromarray(sample.image).save(out / "images" / name)
        Image.fromarray(panoptic_png(sample.panoptic)).save(out / "panoptic" / name)
        Image.fromarray(semantic_map(sample)).save(out / "semantic" / name)
        images.append({"id": index, "file_name": name, "width": w, "height": h})
        pan_annotations.append({"image_id": index, "file_name": name, "segments_info": sample.segments})
        for seg in sample.segments:
            if not CATEGORIES[seg["category_id"]]["isthing"]:
                continue
            rle = mask_util.encode(np.asfortranarray((sample.panoptic == seg["id"]).astype(np.uint8)))
            inst_annotations.append(
                {
                    "id": len(inst_annotations) + 1,
                    "image_id": index,
                    "category_id": seg["category_id"],
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": seg["area"],
                    "bbox": seg["bbox"],
                    "iscrowd": 0,
                }
            )
    info = {"description": "mask2former synthetic shapes", "version": "1", "seed": seed, "size": [h, w]}
    _dump_json(
        {"info": info, "images": images, "annotations": pan_annotations, "categories": CATEGORIES},
        out / "panoptic.json",
    )
    things = [c for c in CATEGORIES if c["isthing"]]
    _dump_json(
        {"info": info, "images": images, "annotations": inst_annotations, "categories": things},
        out / "instances.json",
    )


def run(args) -> int:
    """``m2f synth``: write the dataset and print a summary."""
    size = (int(args.size[0]), int(args.size[1]))
    start = time.perf_counter()
    write_dataset(args.out, args.num_images, args.seed, size)
    seconds = time.perf_counter() - start
    anns = json.loads((Path(args.out) / "panoptic.json").read_text())["annotations"]
    counts = Counter(s["category_id"] for a in anns for s in a["segments_info"])
    per_class = ", ".join(f"{c['name']} {counts[c['id']]}" for c in CATEGORIES)
    print(f"wrote {args.num_images} images of {size[0]}x{size[1]} (seed {args.seed}) to {args.out} in {seconds:.1f}s")
    print(f"segments: {sum(counts.values())} ({per_class})")
    return 0
