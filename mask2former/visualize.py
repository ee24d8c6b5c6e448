"""Drawing segments over an image, for ``m2f predict --overlay``."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 well-separated colours (golden-ratio hues)."""
    hues = (np.arange(n) * 0.618034) % 1.0
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues], dtype=np.uint8)


def draw_overlay(image: Image.Image, segments: list[dict], alpha: float = 0.5) -> Image.Image:
    """Blend each segment's colour over ``image`` with its outline and ``label score`` at its box corner.

    ``segments`` are JSON records as ``m2f predict`` writes them (COCO RLE ``segmentation``, ``bbox``).
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base.copy()
    colours = palette(max(len(segments), 1))
    for seg, colour in zip(segments, colours, strict=False):
        mask = mask_util.decode(seg["segmentation"]).astype(bool)  # (H, W)
        out[mask] = (1 - alpha) * base[mask] + alpha * colour
        inner = mask.copy()  # outline = mask minus its 4-neighbour erosion
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        out[mask & ~inner] = colour
    result = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    for seg, colour in zip(segments, colours, strict=False):
        x, y = seg["bbox"][:2]
        text = f"{seg['label']} {seg['score']:.2f}" if seg.get("score") is not None else seg["label"]
        left, top, right, bottom = draw.textbbox((x, y), text)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=tuple(int(c) for c in colour))
        draw.text((x, y), text, fill=(0, 0, 0))
    return result
