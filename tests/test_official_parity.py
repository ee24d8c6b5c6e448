"""End to end against the official Mask2Former test-time semantics, for every label set's defaults (issue #31).

The oracle here is written from the official code's behaviour (detectron2's ``DefaultPredictor`` and
``ResizeShortestEdge``, Mask2Former's ``MaskFormer.forward`` and its three ``*_inference`` methods) and the
official configs' test settings (its own table, :data:`OFFICIAL`); it uses none of our processing or
post-processing. Ours is the serving path: :func:`load_image`, :func:`preprocess`, the model, and the numpy
post-processing with :meth:`Mask2FormerConfig.postprocess_kwargs` of the config a label set gives.

The photographs come with scikit-image, at odd sizes: a 451x300 cat, a 517x389 crop of the coffee cup and a
300x451 rocket stored on its side with EXIF orientation 6. The network is the demo model with a random
class head of the label set's class count (scaled so that queries are confident: the trained masks give real
regions, the head gives classes, panoptic segments pass the 0.8 threshold). It is shared: the test asserts
that both sides feed it the same pixel tensor bit for bit, so both get the same logits.

Required: the same semantic map (100.000% of pixels), the same panoptic map and segments (every segment
matched at IoU 1.0 with its category), the same top-20 instances (label, mask, score within 1e-5 relative:
the mask score is a float32 mean, summed in another order). Our post-processing computes in float32 with
other summation orders than torch (see tests/test_postprocess_numpy.py), so a pixel whose decision is a
near-tie within float rounding can go either way: such pixels are allowed only as stated at
:data:`NEAR_TIE_RTOL`, counted and printed. On the development machine there is one: 2 panoptic pixels of
ade20k-instance on the cat (two segments there are at IoU 0.999 instead of 1.0); everything else is exact.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mask2former import load_model
from pipeline import postprocess as nq
from pipeline.label_sets import LABEL_SETS, apply_labels
from pipeline.processing import load_image, preprocess

skimage_data = pytest.importorskip("skimage.data")

# The official configs' test settings (facebookresearch/Mask2Former configs/<dataset>/<task>-segmentation/):
# INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST, MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD, and which of
# SEMANTIC_ON, INSTANCE_ON, PANOPTIC_ON are on. SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE is false in all of
# them, but the model forces it on when instance or panoptic inference is on.
OFFICIAL = {
    "coco-panoptic": (800, 1333, 0.8, ("semantic", "instance", "panoptic")),
    "coco-instance": (800, 1333, 0.8, ("instance",)),
    "ade20k-semantic": (512, 2048, 0.8, ("semantic",)),
    "ade20k-semantic-640": (640, 2560, 0.8, ("semantic",)),  # the Swin-B/L *_res640 configs
    "ade20k-panoptic": (640, 2560, 0.8, ("semantic", "instance", "panoptic")),
    "ade20k-instance": (640, 2560, 0.8, ("semantic", "instance", "panoptic")),
    "cityscapes-semantic": (1024, 2048, 0.8, ("semantic",)),
    "cityscapes-panoptic": (1024, 2048, 0.8, ("semantic", "instance", "panoptic")),
    "cityscapes-instance": (1024, 2048, 0.8, ("instance",)),
    "mapillary-vistas-semantic": (2048, 2048, 0.0, ("semantic",)),
    "mapillary-vistas-panoptic": (2048, 2048, 0.0, ("semantic", "panoptic")),
}
PIXEL_MEAN, PIXEL_STD = (123.675, 116.280, 103.530), (58.395, 57.120, 57.375)  # every official config, RGB
SIZE_DIVISIBILITY = 32
OVERLAP_THRESHOLD = 0.8
TOPK_PER_IMAGE = 100  # TEST.DETECTIONS_PER_IMAGE
COMPARED_INSTANCES = 20
SCORE_RTOL = 1e-5
CLASS_GAIN = 8.0  # the random class head's scale: most queries above 0.8, some below


# ---------------------------------------------------------------------------------------------- photographs
def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg_on_its_side(array: np.ndarray) -> bytes:
    """A JPEG of ``array`` turned a quarter counter-clockwise, with EXIF orientation 6 ("rotate 90 clockwise
    to display"), so that a viewer that applies EXIF shows ``array`` upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(array, 1))).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


PHOTOS = {
    "cat-451x300": lambda: encode_png(skimage_data.chelsea()),  # (300, 451, 3)
    "coffee-517x389": lambda: encode_png(skimage_data.coffee()[5:394, 40:557]),
    "rocket-300x451-exif": lambda: encode_jpeg_on_its_side(skimage_data.rocket()[0:451, 170:470]),
}


# ---------------------------------------------------------------------------------------------- the oracle
def official_read(data: bytes) -> np.ndarray:
    """detectron2's ``read_image``: decode, apply the EXIF orientation, RGB -> (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(0x0112, 1)
        rgb = np.asarray(im.convert("RGB"))
    assert orientation in (1, 6), orientation  # the two these photographs use
    return rgb if orientation == 1 else np.ascontiguousarray(np.rot90(rgb, -1))  # 6: a quarter clockwise


def official_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """``ResizeShortestEdge.get_output_shape``: the short side to ``short``, the long side scaled with it, both
    scaled again if the long side is over ``max_size``, then each rounded half up."""
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def official_input(rgb: np.ndarray, short: int, max_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``DefaultPredictor`` + ``MaskFormer.forward`` up to the backbone: PIL bilinear resize, float32, normalize
    in float32, zero padding to the size divisibility -> (1, 3, Hp, Wp) and the resized (h, w)."""
    h, w = official_size(rgb.shape[0], rgb.shape[1], short, max_size)
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    x = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))  # (3, h, w)
    x = (x - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    hp, wp = (-(-s // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in (h, w))
    return F.pad(x, (0, wp - w, 0, hp - h))[None], (h, w)


def to_original(x: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """``sem_seg_postprocess``: crop the padding, bilinear to the original size. (N, Hp, Wp) -> (N, H, W)."""
    x = x[:, : resized[0], : resized[1]]
    return F.interpolate(x[None], size=original, mode="bilinear", align_corners=False)[0]


def official_semantic(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """``semantic_inference``: (Q, K+1), (Q, H, W) logits -> (K, H, W) class scores."""
    return torch.einsum("qc,qhw->chw", mask_cls.softmax(-1)[:, :-1], mask_pred.sigmoid())


def official_panoptic(mask_cls, mask_pred, thing_ids, object_mask_threshold):
    """``panoptic_inference`` -> (H, W) int32 ids, [(id, category, isthing)], and for the comparison the kept
    queries' (M, H, W) score x probability and probability."""
    scores, labels = mask_cls.softmax(-1).max(-1)
    masks = mask_pred.sigmoid()
    keep = (labels != mask_cls.shape[-1] - 1) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], masks[keep]
    seg = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    segments: list[tuple[int, int, bool]] = []
    weighted = scores[:, None, None] * masks  # (M, H, W)
    if len(masks) == 0:
        return seg, segments, weighted, masks
    ids = weighted.argmax(0)  # (H, W)
    stuff_memory: dict[int, int] = {}
    for k in range(len(labels)):
        label = int(labels[k])
        isthing = label in thing_ids
        won = ids == k
        mask = won & (masks[k] >= 0.5)
        area, own, visible = int(won.sum()), int((masks[k] >= 0.5).sum()), int(mask.sum())
        if area == 0 or own == 0 or visible == 0 or area / own < OVERLAP_THRESHOLD:
            continue
        if not isthing and label in stuff_memory:
            seg[mask] = stuff_memory[label]
            continue
        segment_id = len(segments) + 1
        if not isthing:
            stuff_memory[label] = segment_id
        seg[mask] = segment_id
        segments.append((segment_id, label, isthing))
    return seg, segments, weighted, masks


def official_instance(mask_cls, mask_pred, thing_ids, panoptic_on: bool):
    """``instance_inference`` -> masks (N, H, W) bool, labels (N,), scores (N,) in its top-k order, and for the
    comparison the (N, H, W) logits the masks come from."""
    num_classes = mask_cls.shape[-1] - 1
    scores = mask_cls.softmax(-1)[:, :-1]  # (Q, K)
    labels = torch.arange(num_classes).repeat(mask_cls.shape[0])  # (Q*K,) the class of each flat index
    class_scores, flat = scores.flatten().topk(TOPK_PER_IMAGE, sorted=False)
    labels, queries = labels[flat], flat // num_classes
    if panoptic_on:  # instances are things
        keep = torch.tensor([int(lab) in thing_ids for lab in labels], dtype=torch.bool)
        class_scores, labels, queries = class_scores[keep], labels[keep], queries[keep]
    pred = mask_pred[queries]  # (N, H, W)
    masks = (pred > 0).float()
    mask_scores = (pred.sigmoid().flatten(1) * masks.flatten(1)).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return masks.bool(), labels, class_scores * mask_scores, pred


def official_answers(class_logits, mask_logits, resized, original, name: str):
    """``MaskFormer.forward`` for one image: {task: answer} for the tasks the official config turns on."""
    _, _, threshold, tasks = OFFICIAL[name]
    things = LABEL_SETS[name].thing_ids  # the dataset metadata's thing classes
    padded = (mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4)
    mask_pred = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)[0]
    before_inference = "instance" in tasks or "panoptic" in tasks  # SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE forced
    if before_inference:
        mask_pred = to_original(mask_pred, resized, original)
    out = {}
    if "semantic" in tasks:
        scores = official_semantic(class_logits, mask_pred)
        out["semantic"] = scores if before_inference else to_original(scores, resized, original)  # (K, H, W)
    if "panoptic" in tasks:
        out["panoptic"] = official_panoptic(class_logits, mask_pred, things, threshold)
    if "instance" in tasks:
        out["instance"] = official_instance(class_logits, mask_pred, things, "panoptic" in tasks)
    return out


# ---------------------------------------------------------------------------------------------- the network
@pytest.fixture(scope="module")
def demo():
    """The demo network; its class head's input (the final queries) is kept for the label sets' heads."""
    model = load_model()
    queries: list[torch.Tensor] = []
    model.decoder.class_head.register_forward_hook(lambda module, args, out: queries.append(args[0]))
    return model, queries


def class_head(num_labels: int, hidden: int) -> torch.Tensor:
    """A random (K+1, C) class head for a label set of K classes (fixed seed per K)."""
    g = torch.Generator().manual_seed(num_labels)
    return torch.randn(num_labels + 1, hidden, generator=g) * CLASS_GAIN / hidden**0.5


_FORWARDS: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (photo, short, max) -> outputs


def run(demo, key: tuple[str, int, int], pixel_values: np.ndarray, num_labels: int):
    """The network with a K-class head: (1, Q, K+1) class logits and (1, Q, h, w) mask logits. The class
    head is the last layer (nothing reads its output back), so the demo's final queries times the new head
    are the class logits of the network that has it; label sets with the same resize share one forward."""
    model, queries = demo
    if key not in _FORWARDS:
        queries.clear()
        with torch.inference_mode():
            out = model(torch.from_numpy(pixel_values))
        _FORWARDS[key] = (queries[-1], out.mask_logits)
    final_queries, mask_logits = _FORWARDS[key]
    return final_queries @ class_head(num_labels, model.config.hidden_dim).T, mask_logits


# ---------------------------------------------------------------------------------------------- comparisons
# A pixel may differ only where the official decision is a near-tie that float rounding decides: its top two
# values (semantic scores; panoptic score x probability) within NEAR_TIE_RTOL of each other, a panoptic winner's
# probability within NEAR_TIE_RTOL of 0.5, an instance mask's logit within LOGIT_TOL of 0. Our float32
# resize, sigmoid and sums round differently from torch's (a few units in the last place: 1e-6 relative near
# 1, 1e-5 on logits), so such a pixel can go either way. Every one found is counted in NEAR_TIES and printed
# at the end (run with -s); at most MAX_NEAR_TIE_PIXELS per answer. Found on the development machine: one, the
# panoptic answer of ade20k-instance on the cat, 2 pixels where two queries of one class, both at probability
# 0.99997, tie within 4 units in the last place.
NEAR_TIE_RTOL = 1e-6
LOGIT_TOL = 1e-5
MAX_NEAR_TIE_PIXELS = 4
NEAR_TIES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_near_ties():
    yield
    print(f"\nofficial parity, pixels decided by float rounding at a near-tie: {dict(NEAR_TIES) or 'none'}")


def top_two_gap(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, n) values -> (n,) best and (n,) best minus second best."""
    top = torch.topk(values, 2, dim=0).values.numpy()  # (2, n)
    return top[0], top[0] - top[1]


def count_near_ties(key: str, where: np.ndarray, near: np.ndarray, what: str) -> None:
    """Every differing pixel must be a near-tie; there must be few; they are counted under ``key``."""
    assert near.all(), f"{key}: {int((~near).sum())} {what} differ at {where[~near][:5].tolist()}, not at a near-tie"
    assert len(where) <= MAX_NEAR_TIE_PIXELS, f"{key}: {len(where)} near-tie {what}"
    NEAR_TIES[key] += len(where)


def compare_semantic(key: str, ours: np.ndarray, scores: torch.Tensor) -> None:
    differ = np.argwhere(ours != scores.argmax(0).numpy())  # (n, 2)
    if len(differ):
        best, gap = top_two_gap(scores[:, differ[:, 0], differ[:, 1]])
        count_near_ties(key, differ, gap <= NEAR_TIE_RTOL * best, "pixels")


def compare_panoptic(key: str, ours: nq.PanopticResult, official) -> None:
    seg, segments, weighted, probs = official
    assert [(s.id, s.label_id, s.isthing) for s in ours.segments] == segments
    differ = np.argwhere(ours.segmentation != seg.numpy())  # (n, 2): none means every segment at IoU 1.0
    if len(differ):
        ys, xs = differ[:, 0], differ[:, 1]
        best, gap = top_two_gap(weighted[:, ys, xs])
        winner_prob = probs[weighted[:, ys, xs].argmax(0), ys, xs].numpy()
        near = (gap <= NEAR_TIE_RTOL * best) | (np.abs(winner_prob - 0.5) <= NEAR_TIE_RTOL)
        count_near_ties(key, differ, near, "pixels")


def compare_instance(key: str, ours: nq.InstanceRLEs, official) -> None:
    masks, labels, scores, logits = official
    assert len(ours.scores) == len(scores)  # the same pairs: the top-k, things only with panoptic on
    order = torch.argsort(scores, descending=True, stable=True)
    n = min(COMPARED_INSTANCES, len(order))
    # Pairs of equal score (several empty masks score 0) come in an order the official code leaves open (its
    # top-k is unsorted): the comparison runs over whole groups of equal score, compared as sets.
    while n < len(order) and scores[order[n]] == scores[order[n - 1]]:
        n += 1
    order = order[:n]
    np.testing.assert_allclose(ours.scores[:n], scores[order].numpy(), rtol=SCORE_RTOL, atol=0)
    ours_masks = ours.masks[:n]
    for value in torch.unique(scores[order]).tolist():
        group = (scores[order] == value).numpy()  # (n,) positions of that score in the official order
        theirs = zip(labels[order][group].tolist(), masks[order][group].numpy(), logits[order][group].numpy())
        theirs = sorted(theirs, key=lambda t: t[0])  # (label, mask, the logits it comes from)
        mine = sorted(zip(ours.labels[:n][group].tolist(), ours_masks[group]), key=lambda t: t[0])
        assert [t[0] for t in mine] == [t[0] for t in theirs], f"{key}: labels at score {value}"
        for (_, a), (_, b, logit) in zip(mine, theirs):
            differ = np.argwhere(a != b)  # (n, 2)
            if len(differ):
                near = np.abs(logit[differ[:, 0], differ[:, 1]]) <= LOGIT_TOL
                count_near_ties(key, differ, near, "mask pixels")


# ---------------------------------------------------------------------------------------------- the test
# The default run: every label set on the cat, plus the other photographs where the rounding of issue #31
# shows (coffee at 640: 851 wide, truncation gave 850; rocket at 800: 1139 high, truncation gave 1138). With
# ``-m slow``: every label set on every photograph.
DEFAULT_CASES = {(name, "cat-451x300") for name in OFFICIAL}
DEFAULT_CASES |= {("ade20k-panoptic", "coffee-517x389"), ("coco-panoptic", "rocket-300x451-exif")}
CASES = [
    pytest.param(name, photo, id=f"{name}-{photo}", marks=() if (name, photo) in DEFAULT_CASES else pytest.mark.slow)
    for photo in PHOTOS
    for name in OFFICIAL
]


@pytest.mark.parametrize(("name", "photo"), CASES)
def test_answers_equal_the_official_code(demo, name, photo):
    short, max_size, _, tasks = OFFICIAL[name]
    label_set = LABEL_SETS[name]
    cfg = apply_labels(replace(demo[0].config, num_labels=len(label_set.labels), id2label={}), label_set)
    data = PHOTOS[photo]()

    rgb = official_read(data)
    official_pixels, official_resized = official_input(rgb, short, max_size)
    image = load_image(data)
    assert image.size == (rgb.shape[1], rgb.shape[0]) and np.array_equal(np.asarray(image), rgb)
    batch = preprocess([image], cfg.preprocess)
    assert batch.resized_sizes == [official_resized]
    assert np.array_equal(batch.pixel_values, official_pixels.numpy())  # bit for bit: the same network input

    class_logits, mask_logits = run(demo, (photo, short, max_size), batch.pixel_values, len(label_set.labels))
    args = (class_logits.numpy(), mask_logits.numpy(), batch.resized_sizes, batch.original_sizes)
    official = official_answers(class_logits[0], mask_logits[0], official_resized, rgb.shape[:2], name)
    assert set(official) == set(tasks)
    for task, answer in official.items():
        kwargs, key = cfg.postprocess_kwargs(task), f"{name} {photo} {task}"
        if task == "semantic":
            compare_semantic(key, nq.semantic_segmentation(*args, **kwargs)[0], answer)
        elif task == "panoptic":
            compare_panoptic(key, nq.panoptic_segmentation(*args, **kwargs)[0], answer)
        else:
            compare_instance(key, nq.instance_rles(*args, max_instances=TOPK_PER_IMAGE, **kwargs)[0], answer)
