"""Where an evaluation dataset's files are, and how its category ids map onto a model's label ids.

Two folder layouts are read (:func:`find_layout`):

- ``m2f synth``'s: ``images/``, ``panoptic.json`` + ``panoptic/``, ``instances.json``, ``semantic/``;
- COCO's, for a split such as ``val2017``: ``<split>/`` (or ``images/<split>/``) for the images,
  ``annotations/panoptic_<split>.json`` + ``annotations/panoptic_<split>/`` (or ``panoptic_<split>/``) for
  the panoptic PNGs, ``annotations/instances_<split>.json``, and ``semantic_<split>/`` for semantic PNGs.

Category ids (:func:`label_ids`): when every category of the JSON is named like one of the model's labels,
categories map to labels by name (COCO's panoptic ids 1..200 onto a checkpoint's 0..132, COCO's detection
ids onto a panoptic model's labels); otherwise the ids must already be label ids (``m2f synth``'s, or any
dataset written for the model). Semantic PNGs always hold label ids (255 = void), as detectron2's prepared
ADE20K and Cityscapes (``labelTrainIds``) maps do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Mask2FormerConfig


@dataclass(frozen=True)
class DatasetLayout:
    """The files of one dataset split; ``None`` where the dataset has no such ground truth."""

    root: Path
    images: Path
    panoptic_json: Path | None = None
    panoptic_dir: Path | None = None
    instances_json: Path | None = None
    semantic_dir: Path | None = None
    split: str | None = None

    def annotation_files(self) -> list[Path]:
        """The JSON files that define the ground truth (for hashing into a report)."""
        return [p for p in (self.panoptic_json, self.instances_json) if p is not None]

    def describe(self) -> dict[str, Any]:
        """JSON-ready paths, relative to the root where they lie under it."""

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            try:
                return str(p.relative_to(self.root))
            except ValueError:
                return str(p)

        return {
            "root": str(self.root),
            "split": self.split,
            "images": rel(self.images),
            "panoptic_json": rel(self.panoptic_json),
            "panoptic_dir": rel(self.panoptic_dir),
            "instances_json": rel(self.instances_json),
            "semantic_dir": rel(self.semantic_dir),
        }


def _file(path: Path) -> Path | None:
    return path if path.is_file() else None


def _dir(*candidates: Path) -> Path | None:
    return next((p for p in candidates if p.is_dir()), None)


def _coco_splits(root: Path) -> list[str]:
    ann = root / "annotations"
    names = {p.stem.split("_", 1)[1] for p in ann.glob("panoptic_*.json")}
    names |= {p.stem.split("_", 1)[1] for p in ann.glob("instances_*.json")}
    return sorted(names)


def find_layout(data_dir: str | Path, split: str | None = None) -> DatasetLayout:
    """The layout of ``data_dir``: ``m2f synth``'s, or COCO's for ``split`` (needed when there are several).

    Raises:
        FileNotFoundError: no such folder, or no images folder for the split.
        ValueError: a COCO folder with several splits and none chosen, or an unknown split.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found")
    splits = _coco_splits(root)
    if split is None and (root / "images").is_dir() and not splits:
        return DatasetLayout(
            root=root,
            images=root / "images",
            panoptic_json=_file(root / "panoptic.json"),
            panoptic_dir=_dir(root / "panoptic"),
            instances_json=_file(root / "instances.json"),
            semantic_dir=_dir(root / "semantic"),
        )
    if not splits:
        raise FileNotFoundError(
            f"{root} has neither images/ (the m2f synth layout) nor annotations/panoptic_*.json or "
            "annotations/instances_*.json (the COCO layout)"
        )
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"{root} has several splits ({', '.join(splits)}): choose one with --split")
        split = splits[0]
    if split not in splits:
        raise ValueError(f"{root}/annotations has no panoptic_{split}.json or instances_{split}.json ({splits})")
    images = _dir(root / split, root / "images" / split)
    if images is None:
        raise FileNotFoundError(f"no images folder for split {split}: expected {root / split}")
    ann = root / "annotations"
    return DatasetLayout(
        root=root,
        images=images,
        panoptic_json=_file(ann / f"panoptic_{split}.json"),
        panoptic_dir=_dir(ann / f"panoptic_{split}", root / f"panoptic_{split}"),
        instances_json=_file(ann / f"instances_{split}.json"),
        semantic_dir=_dir(root / f"semantic_{split}"),
        split=split,
    )


def _norm(name: Any) -> str:
    return str(name).strip().lower()


def label_ids(categories: list[dict[str, Any]], config: Mask2FormerConfig, source: str) -> dict[int, int]:
    """{dataset category id: model label id}: by name when every category's name is one of the model's
    labels, else the identity (ids must then lie in 0..num_labels-1).

    Raises:
        ValueError: ids outside the model's labels that names cannot map either.
    """
    by_name = {_norm(name): label for label, name in config.id2label.items()}
    names = [c.get("name") for c in categories]
    if categories and all(n is not None and _norm(n) in by_name for n in names):
        return {int(c["id"]): by_name[_norm(c["name"])] for c in categories}
    bad = sorted(int(c["id"]) for c in categories if not 0 <= int(c["id"]) < config.num_labels)
    if bad:
        unnamed = [str(n) for n in names if n is None or _norm(n) not in by_name][:5]
        raise ValueError(
            f"{source} has category ids {bad[:10]} outside the model's labels 0..{config.num_labels - 1}, and "
            f"its categories cannot be matched to the labels by name either (no label named {unnamed})"
        )
    return {int(c["id"]): int(c["id"]) for c in categories}
