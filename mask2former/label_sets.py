"""The public label sets of the official Mask2Former configs, for checkpoints that carry no labels.

A detectron2 checkpoint holds tensors only: class names, which classes are countable "things" and the
test-time resize come from its dataset. Each :class:`LabelSet` gives them as the official configs do
(detectron2's dataset metadata and ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``); every config takes RGB
with ImageNet mean/std. A user's own labels come from a JSON file (:func:`read_labels_json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mask2former.config import Mask2FormerConfig
from mask2former.labels import CITYSCAPES_THINGS, COCO_THINGS, known_thing_ids


@dataclass(frozen=True)
class LabelSet:
    """Class names (index = class id), the ids of the thing classes, and the test-time resize."""

    name: str
    labels: tuple[str, ...]
    thing_ids: frozenset[int]
    shortest_edge: int | None = None  # None: keep the checkpoint's (or the default) resize
    longest_edge: int | None = None

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
    sets = [
        LabelSet("coco-panoptic", coco, _ids(coco, COCO_THINGS), 800, 1333),
        LabelSet("coco-instance", COCO_THINGS, frozenset(range(80)), 800, 1333),
        LabelSet("ade20k-semantic", ADE20K_150, frozenset(), 512, 2048),
        LabelSet("ade20k-panoptic", ADE20K_150, _ids(ADE20K_150, ADE20K_THINGS), 640, 2560),
        LabelSet("ade20k-instance", ADE20K_THINGS, frozenset(range(100)), 640, 2560),
        LabelSet("cityscapes-semantic", CITYSCAPES_19, frozenset(), 1024, 2048),
        LabelSet("cityscapes-panoptic", CITYSCAPES_19, _ids(CITYSCAPES_19, CITYSCAPES_THINGS), 1024, 2048),
        LabelSet("cityscapes-instance", CITYSCAPES_THINGS, frozenset(range(8)), 1024, 2048),
        LabelSet("mapillary-vistas-semantic", MAPILLARY_VISTAS_65, frozenset(), 2048, 2048),
        LabelSet("mapillary-vistas-panoptic", MAPILLARY_VISTAS_65, _ids(MAPILLARY_VISTAS_65, mapillary_things), 2048, 2048),
    ]  # fmt: skip
    return {s.name: s for s in sets}


LABEL_SETS: dict[str, LabelSet] = _sets()

# The set assumed for a checkpoint named without labels, by its class count. Where a dataset has a semantic
# and a panoptic set (same names), the panoptic one: it also says which classes are things.
DEFAULT_BY_COUNT: dict[int, str] = {
    133: "coco-panoptic",
    80: "coco-instance",
    150: "ade20k-panoptic",
    100: "ade20k-instance",
    19: "cityscapes-panoptic",
    8: "cityscapes-instance",
    65: "mapillary-vistas-panoptic",
}


def read_labels_json(path: str | Path) -> LabelSet:
    """A user's label set from JSON: a list of names, or ``{"labels": [...] | "id2label": {...},
    "thing_ids": [...], "shortest_edge": n, "longest_edge": n}`` (all but the names optional).

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
    return LabelSet(path.stem, labels, things, **edges)


def resolve_labels(spec: str | Path | None, num_labels: int) -> LabelSet | None:
    """The label set named by ``spec`` (a set name or a JSON file) for a model with ``num_labels`` classes.

    Without ``spec``, the default set for that class count (:data:`DEFAULT_BY_COUNT`), or None when there is
    none (the model then gets generic names and no things).

    Raises:
        ValueError: an unknown name, or a set whose size is not ``num_labels``.
    """
    if spec is None:
        name = DEFAULT_BY_COUNT.get(num_labels)
        return LABEL_SETS[name] if name else None
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


def apply_labels(cfg: Mask2FormerConfig, label_set: LabelSet | None) -> Mask2FormerConfig:
    """``cfg`` with the names, thing ids and test-time resize of ``label_set`` (unchanged for None)."""
    if label_set is None:
        return cfg
    if len(label_set.labels) != cfg.num_labels:
        raise ValueError(
            f"the checkpoint has {cfg.num_labels} classes but labels {label_set.name!r} has {len(label_set.labels)}"
        )
    cfg = replace(cfg, id2label=dict(enumerate(label_set.labels)), thing_ids=label_set.thing_ids)
    edges = {"shortest_edge": label_set.shortest_edge, "longest_edge": label_set.longest_edge}
    return cfg.with_preprocess(**{k: v for k, v in edges.items() if v is not None})
