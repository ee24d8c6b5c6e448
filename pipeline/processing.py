"""Image loading and preprocessing (decode -> RGB -> resize -> normalize -> pad), in numpy and PIL only.

No torch here: the ONNX Runtime serving path runs without it. Every step is the official Mask2Former test-time
input path (detectron2's ``DefaultPredictor``): EXIF orientation, RGB, ``ResizeShortestEdge`` (its output size
arithmetic, PIL bilinear), ImageNet mean/std in the 0..255 scale in float32, zero padding (bottom/right) to a
multiple of the size divisor. The resized size is reported so that post-processing can crop the padding away.
HF's ``Mask2FormerImageProcessor`` differs twice: it truncates the long side where detectron2 rounds (one
pixel apart for many image sizes), and it stretches every image to a multiple of ``size_divisor``
where detectron2 (and we) pad.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Collection
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import PreprocessConfig

ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class Batch(NamedTuple):
    pixel_values: np.ndarray  # (B, 3, Hp, Wp) float32, zero-padded bottom/right
    resized_sizes: list[tuple[int, int]]  # (h, w) of each image inside the padded tensor
    original_sizes: list[tuple[int, int]]  # (H, W) of each image as given


# ---------------------------------------------------------------------------------------------- loading
class UnsupportedImageFormat(ValueError):
    """The data is not an image, or not in one of the accepted formats."""


class ImageTooLarge(ValueError):
    """The image has more pixels than allowed (known from its header, before decoding)."""


def load_image(
    source: ImageSource, formats: Collection[str] | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode an image into an RGB ``PIL.Image``.

    EXIF orientation is applied first; animated images give their first frame; every PIL mode is turned
    into 8-bit RGB (alpha composited onto white, 16-bit grey scaled by 255/65535, float grey in 0..1
    scaled by 255 and otherwise clipped to 0..255).

    Args:
        source: a path, the encoded bytes, or a binary file object.
        formats: PIL format names to accept (e.g. ``{"JPEG", "PNG"}``); default: any PIL reads.
        max_pixels: refuse images with more pixels than this, judged from the header before decoding.

    Raises:
        ValueError: the image has zero width or height.
        PIL.UnidentifiedImageError: the data is not an image PIL can read (with ``formats``:
            :class:`UnsupportedImageFormat`, as for a format not in ``formats``).
        ImageTooLarge: over ``max_pixels``.
        OSError: the data is truncated or otherwise cannot be decoded.
    """
    if isinstance(source, (str, Path)):
        data = Path(source).read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = source.read()
    try:
        img = Image.open(io.BytesIO(data), formats=None if formats is None else list(formats))
    except UnidentifiedImageError:
        # Pillow refuses zero-size images as "not an image"; say what is wrong when the header tells us.
        declared = _declared_size(data)
        if declared is not None and 0 in declared:
            raise ValueError(f"zero-size image ({declared[0]}x{declared[1]})") from None
        if formats is not None:
            accepted = ", ".join(sorted(formats))
            raise UnsupportedImageFormat(f"not an image in an accepted format ({accepted})") from None
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None
    with img:
        if img.width == 0 or img.height == 0:
            raise ValueError(f"zero-size image ({img.width}x{img.height})")
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageTooLarge(f"image of {img.width}x{img.height} pixels is over the limit of {max_pixels} pixels")
        img.seek(0)  # animated images: the first frame
        img = ImageOps.exif_transpose(img)  # a loaded copy, transposed when the EXIF says so
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see :func:`load_image` for the rules)."""
    if img.width == 0 or img.height == 0:
        raise ValueError(f"zero-size image ({img.width}x{img.height})")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.int64)
        # "I" is what 16-bit files decode to in some Pillow versions: read it as 16-bit too.
        grey = np.clip(grey, 0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(grey8, mode="L").convert("RGB")
    if mode == "F":
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if grey.size and grey.min() >= 0.0 and grey.max() <= 1.0:
            grey = grey * 255.0
        grey8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8, mode="L").convert("RGB")
    has_alpha = "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB: {e}") from e


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, GIF, BMP, JPEG or WebP; None when unknown."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data.startswith(b"BM"):
            header_size = struct.unpack("<I", data[14:18])[0]
            if header_size == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            kind = data[12:16]
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if kind == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if kind == b"VP8X":
                return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if data.startswith(b"\xff\xd8"):
            i = 2
            while i + 9 <= len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                    i += 2
                    continue
                length = struct.unpack(">H", data[i + 2 : i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + length
    except struct.error:
        return None
    return None


# ---------------------------------------------------------------------------------------------- resize
def resize_shape(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """Output (height, width) of the shortest-edge resize, with detectron2's ``ResizeShortestEdge`` arithmetic.

    The short side is set to ``shortest_edge`` and the long side scaled with it, both kept as floats; when the
    long side then exceeds ``longest_edge`` (0: no limit), both are scaled again by ``longest_edge`` / long
    side. Only then is each side rounded, half up (``int(x + 0.5)``), so that the sizes are those of the
    official code to the bit (same float operations in the same order). Either side is at least 1.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = shortest_edge * 1.0 / min(height, width)
    if height < width:
        new_h, new_w = shortest_edge * 1.0, scale * width
    else:  # a square image goes this way too, as in detectron2
        new_h, new_w = scale * height, shortest_edge * 1.0
    if longest_edge and max(new_h, new_w) > longest_edge:
        cap = longest_edge * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    # Extreme aspect ratios can round a side to 0 (detectron2 would then fail): keep at least 1 pixel.
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


# ---------------------------------------------------------------------------------------------- batch
def preprocess(
    images: list[Image.Image | np.ndarray],
    cfg: PreprocessConfig,
    pad_to: tuple[int, int] | None = None,
) -> Batch:
    """Resize, normalize and pad a list of images into one float32 batch.

    Args:
        images: RGB ``PIL.Image`` (other modes are converted with :func:`to_rgb`) or (H, W, 3) uint8 arrays.
        cfg: resize sizes, mean/std in the 0..255 scale, and the size divisor.
        pad_to: pad to this (height, width) instead of the batch's largest size rounded up to a multiple
            of ``cfg.size_divisor`` (the server buckets shapes). Must hold every resized image.

    Returns:
        A :class:`Batch`; padding (bottom/right) is 0, i.e. the mean colour.
    """
    if not images:
        raise ValueError("preprocess needs at least one image")
    resized: list[np.ndarray] = []
    original_sizes: list[tuple[int, int]] = []
    for img in images:
        pil = _as_rgb_pil(img)
        w, h = pil.size
        new_h, new_w = resize_shape(h, w, cfg.shortest_edge, cfg.longest_edge)
        if (new_h, new_w) != (h, w):
            pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
        original_sizes.append((h, w))
        resized.append(np.asarray(pil))  # (h, w, 3) uint8

    resized_sizes = [(a.shape[0], a.shape[1]) for a in resized]
    div = max(cfg.size_divisor, 1)
    if pad_to is None:
        max_h = max(s[0] for s in resized_sizes)
        max_w = max(s[1] for s in resized_sizes)
        pad_h, pad_w = -(-max_h // div) * div, -(-max_w // div) * div
    else:
        pad_h, pad_w = int(pad_to[0]), int(pad_to[1])
        if pad_h % div or pad_w % div:
            raise ValueError(f"pad_to {pad_to} is not a multiple of size_divisor {div}")
        too_big = [s for s in resized_sizes if s[0] > pad_h or s[1] > pad_w]
        if too_big:
            raise ValueError(f"pad_to {pad_to} is smaller than resized image(s) {too_big}")

    # One look-up table per channel: (v - mean) / std for every uint8 value v, in float32 as detectron2 computes
    # it (a float32 subtraction, then a float32 division, each rounded), so the network gets the official bits.
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None]
    lut = (np.arange(256, dtype=np.float32)[None, :] - mean) / std  # (3, 256) float32

    pixel_values = np.zeros((len(resized), 3, pad_h, pad_w), dtype=np.float32)
    for i, arr in enumerate(resized):
        h, w = arr.shape[:2]
        for c in range(3):
            pixel_values[i, c, :h, :w] = lut[c][arr[:, :, c]]
    return Batch(pixel_values, resized_sizes, original_sizes)


def _as_rgb_pil(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, Image.Image):
        return to_rgb(img)
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"arrays must be (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"zero-size image ({img.shape[1]}x{img.shape[0]})")
        return Image.fromarray(np.ascontiguousarray(img), mode="RGB")
    raise TypeError(f"expected a PIL image or a numpy array, got {type(img).__name__}")
