"""Thing/stuff metadata for label sets whose checkpoints do not carry it.

HF ``config.json`` files list label names but not which labels are countable "things". Checkpoints we
write carry a ``thing_ids`` list; for the public ones we recognise thing classes by name: the 80 COCO
detection categories and the 8 Cityscapes instance classes. A name outside these sets is stuff.
"""

from __future__ import annotations

COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
CITYSCAPES_THINGS = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")

_THING_NAMES = frozenset(COCO_THINGS) | frozenset(CITYSCAPES_THINGS)


def known_thing_ids(id2label: dict[int, str]) -> frozenset[int]:
    """Ids whose label name is a known thing class (case-insensitive)."""
    return frozenset(i for i, name in id2label.items() if name.strip().lower() in _THING_NAMES)
