"""The public label sets of the official Mask2Former configs, for checkpoints that carry no labels.

A detectron2 checkpoint holds tensors only: class names, which classes are countable "things", the
test-time resize and the panoptic score threshold come from its config and dataset. Each :class:`LabelSet`
gives them as the official configs do (detectron2's dataset metadata, ``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``, ``MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD``); every config takes RGB with ImageNet
mean/std. A user's own labels come from a JSON file (:func:`read_labels_json`). For a file given without
labels, :func:`detect_label_set` picks the set from what the file shows, or asks for one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.config import Mask2FormerConfig
from pipeline.labels import CITYSCAPES_THINGS, COCO_THINGS, known_thing_ids


@dataclass(frozen=True)
class LabelSet:
    """Class names (index = class id), the ids of the thing classes, and the test-time resize."""

    name: str
    labels: tuple[str, ...]
    thing_ids: frozenset[int]
    shortest_edge: int | None = None  # None: keep the checkpoint's (or the default) resize
    longest_edge: int | None = None
    threshold: float | None = None  # the panoptic score threshold; None: keep the checkpoint's (or the default)

    def __post_init__(self) -> None:
        if any(i < 0 or i >= len(self.labels) for i in self.thing_ids):
            raise ValueError(f"label set {self.name!r}: thing ids out of range 0..{len(self.labels) - 1}")


# COCO panoptic: the 80 detection classes (things, ids 0-79), then 53 stuff classes (detectron2's order).
COCO_PANOPTIC_STUFF = (
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower",
    "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield",
    "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel",
    "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other", "window-blind", "window-other",
    "tree-merged", "fence-merged", "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged",
    "floor-other-merged", "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged", "paper-merged",
    "food-other-merged", "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
)  # fmt: skip

# ADE20K SceneParsing, 150 classes (detectron2's ADE20K_SEM_SEG names).
ADE20K_150 = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
# The 50 stuff classes of ADE20K panoptic; the other 100 are its things and, in this order, the classes of
# ADE20K instance segmentation.
ADE20K_STUFF = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "grass", "sidewalk", "earth", "mountain",
    "plant", "water", "house", "sea", "rug", "field", "rock", "base", "sand", "skyscraper", "grandstand",
    "path", "runway", "stairway", "river", "bridge", "blind", "hill", "bar", "hovel", "tower", "dirt track",
    "land", "escalator", "buffet", "poster", "stage", "conveyer belt", "canopy", "swimming pool", "waterfall",
    "tent", "cradle", "tank", "lake", "blanket", "pier", "crt screen", "shower",
)  # fmt: skip
ADE20K_THINGS = tuple(n for n in ADE20K_150 if n not in ADE20K_STUFF)

CITYSCAPES_19 = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", *CITYSCAPES_THINGS,
)  # fmt: skip

# Mapillary Vistas v1.2, 65 classes (without "Unlabeled"); the things are those with instances.
MAPILLARY_VISTAS_65 = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane", "Crosswalk - Plain",
    "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane", "Sidewalk", "Bridge",
    "Building", "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk",
    "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner",
    "Bench", "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox",
    "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame", "Utility Pole",
    "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car",
    "Caravan", "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow", "Car Mount",
    "Ego Vehicle",
)  # fmt: skip
MAPILLARY_VISTAS_STUFF = (
    "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane", "Curb Cut", "Parking", "Pedestrian Area",
    "Rail Track", "Road", "Service Lane", "Sidewalk", "Bridge", "Building", "Tunnel", "Lane Marking - General",
    "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Pothole", "On Rails", "Car Mount",
    "Ego Vehicle",
)  # fmt: skip


def _ids(labels: tuple[str, ...], things: tuple[str, ...]) -> frozenset[int]:
    return frozenset(i for i, n in enumerate(labels) if n in things)


def _sets() -> dict[str, LabelSet]:
    coco = (*COCO_THINGS, *COCO_PANOPTIC_STUFF)
    mapillary_things = tuple(n for n in MAPILLARY_VISTAS_65 if n not in MAPILLARY_VISTAS_STUFF)
    # Test sizes and OBJECT_MASK_THRESHOLD of the official configs (configs/<dataset>/<task>-segmentation/):
    # COCO has detectron2's default test size; ADE20K's semantic Swin-B and Swin-L configs (*_res640) test at
    # 640/2560, its other semantic ones at 512/2048; Mapillary Vistas' threshold is 0.0, every other 0.8.
    sets = [
        LabelSet("coco-panoptic", coco, _ids(coco, COCO_THINGS), 800, 1333, 0.8),
        LabelSet("coco-instance", COCO_THINGS, frozenset(range(80)), 800, 1333, 0.8),
        LabelSet("ade20k-semantic", ADE20K_150, frozenset(), 512, 2048, 0.8),
        LabelSet("ade20k-semantic-640", ADE20K_150, frozenset(), 640, 2560, 0.8),
        LabelSet("ade20k-panoptic", ADE20K_150, _ids(ADE20K_150, ADE20K_THINGS), 640, 2560, 0.8),
        LabelSet("ade20k-instance", ADE20K_THINGS, frozenset(range(100)), 640, 2560, 0.8),
        LabelSet("cityscapes-semantic", CITYSCAPES_19, frozenset(), 1024, 2048, 0.8),
        LabelSet("cityscapes-panoptic", CITYSCAPES_19, _ids(CITYSCAPES_19, CITYSCAPES_THINGS), 1024, 2048, 0.8),
        LabelSet("cityscapes-instance", CITYSCAPES_THINGS, frozenset(range(8)), 1024, 2048, 0.8),
        LabelSet("mapillary-vistas-semantic", MAPILLARY_VISTAS_65, frozenset(), 2048, 2048, 0.0),
        LabelSet("mapillary-vistas-panoptic", MAPILLARY_VISTAS_65, _ids(MAPILLARY_VISTAS_65, mapillary_things), 2048, 2048, 0.0),
    ]  # fmt: skip
    return {s.name: s for s in sets}


LABEL_SETS: dict[str, LabelSet] = _sets()

# Class counts that only one public set has: a file with that many classes gets it.
ONLY_SET_BY_COUNT: dict[int, str] = {
    133: "coco-panoptic",
    80: "coco-instance",
    100: "ade20k-instance",
    8: "cityscapes-instance",
}

# Class counts that several sets share (semantic and panoptic models of one dataset): the set is read from the
# file where it shows, else asked for.
SETS_BY_COUNT: dict[int, tuple[str, ...]] = {
    150: ("ade20k-semantic", "ade20k-semantic-640", "ade20k-panoptic"),
    19: ("cityscapes-semantic", "cityscapes-panoptic"),
    65: ("mapillary-vistas-semantic", "mapillary-vistas-panoptic"),
}

# The official model-zoo files of those datasets (MODEL_ZOO.md; each name, model_final_<md5 prefix>.pkl, holds
# the first 6 hex digits of the file's md5) and their sets.
ZOO_FILES: dict[str, str] = {
    **dict.fromkeys(("500878", "0d68be", "5274a6", "011c6d"), "ade20k-semantic"),  # R50, R101, Swin-T, Swin-S
    **dict.fromkeys(("503e96", "7e47bf", "6b4a3a"), "ade20k-semantic-640"),  # Swin-B, Swin-B IN21k, Swin-L
    **dict.fromkeys(("5c90d4", "e0c58e"), "ade20k-panoptic"),  # R50, Swin-L
    **dict.fromkeys(("cc1b1f", "257ce8", "2d58d4", "fa26ae", "1c6b65", "17c1ee"), "cityscapes-semantic"),
    **dict.fromkeys(("4ab90c", "04d286", "ceba0f", "23efb7", "fa840f", "064788"), "cityscapes-panoptic"),
    **dict.fromkeys(("6c66d0", "90ee2d"), "mapillary-vistas-semantic"),  # R50, Swin-L
    **dict.fromkeys(("4e9874", "132c71"), "mapillary-vistas-panoptic"),  # R50, Swin-L
}
_ZOO_NAME = re.compile(r"model_final_([0-9a-f]{6})\.(pkl|pth)$")


class LabelSetUnknown(ValueError):
    """The checkpoint's class count fits several label sets and the file does not show which it was trained on."""


def detect_label_set(num_labels: int, num_queries: int, file_name: str = "") -> tuple[LabelSet | None, str]:
    """The label set of a checkpoint given without labels, and why (one line for the load message).

    A count only one public set has gives that set. A count several share (ADE20K, Cityscapes, Mapillary
    Vistas: semantic and panoptic) is decided by what the file shows: an official model-zoo file name, or 200
    queries (every official semantic model has 100; the panoptic Swin-L ones have 200). Other counts give None
    (generic names, no things).

    Raises:
        LabelSetUnknown: a shared count and nothing in the file that decides (one line naming the choices).
    """
    if num_labels in ONLY_SET_BY_COUNT:
        name = ONLY_SET_BY_COUNT[num_labels]
        return LABEL_SETS[name], f"{name}: the only public label set with {num_labels} classes"
    choices = SETS_BY_COUNT.get(num_labels)
    if choices is None:
        return None, f"no public label set has {num_labels} classes: generic names, no things"
    zoo = _ZOO_NAME.search(file_name)
    if zoo and ZOO_FILES.get(zoo[1]) in choices:
        name = ZOO_FILES[zoo[1]]
        return LABEL_SETS[name], f"{name}: the official model-zoo file {zoo[0]}"
    if num_queries == 200:
        name = choices[-1]  # the panoptic set
        return LABEL_SETS[
            name
        ], f"{name}: 200 queries (the official semantic models with {num_labels} classes have 100)"
    described = ", ".join(
        f"{n} ({LABEL_SETS[n].shortest_edge}/{LABEL_SETS[n].longest_edge}"
        f"{', things' if LABEL_SETS[n].thing_ids else ''})"
        for n in choices
    )
    raise LabelSetUnknown(
        f"a checkpoint with {num_labels} classes can be {described} and the file does not show which: "
        "name one with --labels (labels=)"
    )


def read_labels_json(path: str | Path) -> LabelSet:
    """A user's label set from JSON: a list of names, or ``{"labels": [...] | "id2label": {...},
    "thing_ids": [...], "shortest_edge": n, "longest_edge": n, "threshold": x}`` (all but the names optional).

    Without ``thing_ids``, names of the COCO and Cityscapes thing classes are things.

    Raises:
        ValueError: a file that is not such JSON.
    """
    path = Path(path)
    try:
        d: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read labels file {path}: {e}") from None
    if isinstance(d, list):
        d = {"labels": d}
    if not isinstance(d, dict):
        raise ValueError(f"labels file {path}: expected a list of names or an object with 'labels' or 'id2label'")
    if "labels" in d:
        labels = d["labels"]
    elif "id2label" in d:
        id2label = {int(k): v for k, v in d["id2label"].items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"labels file {path}: id2label ids must be 0..N-1")
        labels = [id2label[i] for i in range(len(id2label))]
    else:
        raise ValueError(f"labels file {path}: expected a list of names or an object with 'labels' or 'id2label'")
    if not labels or not all(isinstance(n, str) for n in labels):
        raise ValueError(f"labels file {path}: the labels must be a non-empty list of strings")
    labels = tuple(labels)
    if "thing_ids" in d:
        things = frozenset(int(i) for i in d["thing_ids"])
    else:
        things = known_thing_ids(dict(enumerate(labels)))
    edges = {k: int(d[k]) for k in ("shortest_edge", "longest_edge") if k in d}
    threshold = {"threshold": float(d["threshold"])} if "threshold" in d else {}
    return LabelSet(path.stem, labels, things, **edges, **threshold)


def resolve_labels(spec: str | Path, num_labels: int) -> LabelSet:
    """The label set named by ``spec`` (a set name or a JSON file) for a model with ``num_labels`` classes.

    Raises:
        ValueError: an unknown name, or a set whose size is not ``num_labels``.
    """
    if str(spec) in LABEL_SETS:
        label_set = LABEL_SETS[str(spec)]
    elif Path(spec).suffix == ".json" or Path(spec).is_file():
        label_set = read_labels_json(spec)
    else:
        raise ValueError(f"unknown label set {str(spec)!r}: one of {', '.join(LABEL_SETS)}, or a labels .json file")
    if len(label_set.labels) != num_labels:
        raise ValueError(
            f"the checkpoint has {num_labels} classes but labels {label_set.name!r} has {len(label_set.labels)}"
        )
    return label_set


def apply_labels(cfg: Mask2FormerConfig, label_set: LabelSet | None, source: str | None = None) -> Mask2FormerConfig:
    """``cfg`` with the names, thing ids, test-time resize and panoptic threshold of ``label_set`` (unchanged for
    None), and ``source`` (why this set, when it was chosen rather than given) as its ``label_source``."""
    if label_set is None:
        return replace(cfg, label_source=source)
    if len(label_set.labels) != cfg.num_labels:
        raise ValueError(
            f"the checkpoint has {cfg.num_labels} classes but labels {label_set.name!r} has {len(label_set.labels)}"
        )
    cfg = replace(cfg, id2label=dict(enumerate(label_set.labels)), thing_ids=label_set.thing_ids, label_source=source)
    if label_set.threshold is not None:
        cfg = replace(cfg, threshold=label_set.threshold)
    edges = {"shortest_edge": label_set.shortest_edge, "longest_edge": label_set.longest_edge}
    return cfg.with_preprocess(**{k: v for k, v in edges.items() if v is not None})
