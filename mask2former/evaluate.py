"""``m2f eval``: run a checkpoint over a COCO-style dataset and score it (PQ, mask AP or mIoU).

The dataset folder (what ``m2f synth`` writes; COCO conventions, category ids = the model's label ids)::

    images/<file_name>          the images listed in the JSON files
    panoptic.json               COCO panoptic: images, annotations (segments_info), categories (isthing)
    panoptic/<file_name>.png    COCO panoptic PNGs: id = R + 256 G + 256^2 B, 0 = void
    instances.json              COCO instances (things only), RLE or polygon segmentations
    semantic/<image stem>.png   uint8 class ids, 255 = void

The pipeline is the serving one: :func:`~mask2former.processing.load_image`, batched
:func:`~mask2former.processing.preprocess`, the model (PyTorch, or a runner such as ONNX Runtime's), and the
task's post-processing (:func:`service.pipeline.postprocess`, numpy) with the checkpoint's defaults (panoptic: the config's ``threshold``, ``mask_threshold``
and ``overlap_mask_area_threshold``; instance: threshold 0.0 and the top 100 pairs). The metrics and their
conventions are in :mod:`mask2former.metrics`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mask2former import metrics
from mask2former.postprocess_numpy import TASKS

MAX_INSTANCES = 100  # COCO scores at most 100 detections per image


@dataclass(frozen=True)
class _Image:
    id: int
    file_name: str
    height: int | None
    width: int | None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def _images(dataset: dict[str, Any]) -> list[_Image]:
    return [
        _Image(int(im["id"]), str(im["file_name"]), im.get("height"), im.get("width"))
        for im in dataset.get("images", [])
    ]


def _check_categories(categories: list[dict[str, Any]], num_labels: int, source: str) -> None:
    bad = sorted(int(c["id"]) for c in categories if not 0 <= int(c["id"]) < num_labels)
    if bad:
        raise ValueError(f"{source} has category ids {bad} outside the model's labels 0..{num_labels - 1}")


def read_id_map(path: Path) -> np.ndarray:
    """A COCO panoptic PNG -> (H, W) int64 segment ids (R + 256 G + 256^2 B)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)  # (H, W, 3)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_label_map(path: Path) -> np.ndarray:
    """A semantic PNG (one channel, class ids, 255 = void) -> (H, W) int64."""
    img = Image.open(path)
    if img.mode not in ("L", "P"):
        raise ValueError(f"{path}: semantic maps must be single-channel 8-bit PNGs, got mode {img.mode}")
    return np.asarray(img, dtype=np.int64)


class _Task:
    """Per-task dataset reading and metric accumulation; ``add`` takes one image's post-processed result."""

    images: list[_Image]

    def add(self, image: _Image, result: Any) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError


class _Panoptic(_Task):
    def __init__(self, data_dir: Path, config) -> None:
        dataset = _read_json(data_dir / "panoptic.json")
        self.root = data_dir / "panoptic"
        self.categories = dataset.get("categories", [])
        _check_categories(self.categories, config.num_labels, "panoptic.json")
        unknown = sorted(set(range(config.num_labels)) - {int(c["id"]) for c in self.categories})
        if unknown:  # a prediction of such a label could not be scored (panopticapi refuses it too)
            raise ValueError(f"the model's labels {unknown} are not among panoptic.json's categories")
        self.annotations = {int(a["image_id"]): a for a in dataset.get("annotations", [])}
        self.images = _images(dataset)
        missing = [im.id for im in self.images if im.id not in self.annotations]
        if missing:
            raise ValueError(f"panoptic.json has no annotation for image ids {missing[:10]}")
        self.pq = metrics.PanopticQuality(self.categories)

    def add(self, image: _Image, result) -> None:
        ann = self.annotations[image.id]
        gt_map = read_id_map(self.root / ann["file_name"])
        pred_map = result.segmentation
        pred_segments = [{"id": s.id, "category_id": s.label_id} for s in result.segments]
        self.pq.update(gt_map, ann["segments_info"], pred_map, pred_segments)

    def compute(self) -> dict[str, Any]:
        return self.pq.compute()


class _Instance(_Task):
    def __init__(self, data_dir: Path, config) -> None:
        self.dataset = _read_json(data_dir / "instances.json")
        _check_categories(self.dataset.get("categories", []), config.num_labels, "instances.json")
        self.category_ids = {int(c["id"]) for c in self.dataset.get("categories", [])}
        self.images = _images(self.dataset)
        self.predictions: list[dict[str, Any]] = []

    def add(self, image: _Image, result) -> None:
        from pycocotools import mask as mask_util

        labels = result.labels
        keep = np.isin(labels, list(self.category_ids))  # other labels (stuff) are not scored by COCOeval
        masks = result.masks[keep]  # (N, H, W) bool
        if len(masks) == 0:
            return
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for rle, label, score in zip(rles, labels[keep].tolist(), result.scores[keep].tolist()):
            rle["counts"] = rle["counts"].decode("ascii")
            self.predictions.append({"image_id": image.id, "category_id": label, "segmentation": rle, "score": score})

    def compute(self) -> dict[str, Any]:
        return metrics.mask_ap(self.dataset, self.predictions, image_ids=[im.id for im in self.images])


class _Semantic(_Task):
    def __init__(self, data_dir: Path, config) -> None:
        self.root = data_dir / "semantic"
        for name in ("panoptic.json", "instances.json"):
            if (data_dir / name).is_file():
                self.images = _images(_read_json(data_dir / name))
                break
        else:  # no JSON: every semantic map with an image of the same stem
            by_stem = {p.stem: p.name for p in sorted((data_dir / "images").glob("*")) if p.is_file()}
            stems = [p.stem for p in sorted(self.root.glob("*.png"))]
            self.images = [_Image(i, by_stem[s], None, None) for i, s in enumerate(stems) if s in by_stem]
        self.miou = metrics.MeanIoU(config.num_labels, ignore_index=255)
        self.names = dict(config.id2label)

    def add(self, image: _Image, result) -> None:
        gt = read_label_map(self.root / (Path(image.file_name).stem + ".png"))
        self.miou.update(gt, result)

    def compute(self) -> dict[str, Any]:
        out = self.miou.compute()
        out["names"] = {c: self.names.get(c, str(c)) for c in out["per_class"]}
        return out


def evaluate(
    model,
    data_dir: str | Path,
    task: str,
    batch_size: int = 4,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``model`` over the dataset in ``data_dir`` and score ``task``.

    Args:
        model: a :class:`~mask2former.mask2former.Mask2Former`, or a runner with ``config`` and
            ``run(pixel_values) -> (class_logits, mask_logits)`` such as the ONNX Runtime one; its
            ``config`` gives labels and defaults.
        data_dir: the dataset folder (see the module docstring).
        task: ``"panoptic"`` (PQ/SQ/RQ), ``"instance"`` (mask AP) or ``"semantic"`` (mIoU).
        batch_size: images per forward pass.
        limit: evaluate the first ``limit`` images (in JSON order) only.
        progress: show a tqdm progress bar on standard error.

    Returns:
        ``{"task", "model", "data", "num_images", "metrics"}``, ``metrics`` being what
        :func:`~mask2former.metrics.panoptic_quality`, :func:`~mask2former.metrics.mask_ap` or
        :func:`~mask2former.metrics.mean_iou` return.
    """
    from tqdm import tqdm

    from mask2former.processing import load_image, preprocess
    from service import pipeline

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {data_dir} not found")
    cfg = model.config
    scorer: _Task = {"panoptic": _Panoptic, "instance": _Instance, "semantic": _Semantic}[task](data_dir, cfg)
    images = scorer.images[:limit] if limit is not None else scorer.images
    scorer.images = images
    if not images:
        raise ValueError(f"no images to evaluate in {data_dir}")
    with tqdm(total=len(images), desc=f"eval {task}", unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pil_images = [load_image(data_dir / "images" / im.file_name) for im in chunk]
            for im, pil in zip(chunk, pil_images):
                if im.width is not None and im.height is not None and pil.size != (int(im.width), int(im.height)):
                    raise ValueError(
                        f"{im.file_name} is {pil.size[0]}x{pil.size[1]} but the JSON says {im.width}x{im.height}"
                    )
            batch = preprocess(pil_images, cfg.preprocess)
            class_logits, mask_logits = run_model(model, batch.pixel_values)
            params = {"max_instances": MAX_INSTANCES} if task == "instance" else {}
            results = pipeline.postprocess(
                task, cfg, class_logits, mask_logits, batch.resized_sizes, batch.original_sizes, **params
            )
            for im, result in zip(chunk, results):
                scorer.add(im, result)
            bar.update(len(chunk))

    return {
        "task": task,
        "model": cfg.name,
        "data": str(data_dir),
        "num_images": len(images),
        "metrics": scorer.compute(),
    }


def run_model(model, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class_logits, mask_logits) as float32 numpy from a PyTorch model, or from a runner with
    ``run(pixel_values)`` (:mod:`service.runtime`)."""
    if hasattr(model, "run"):
        return model.run(pixel_values)
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(torch.from_numpy(pixel_values).to(device))
    return out.class_logits.float().cpu().numpy(), out.mask_logits.float().cpu().numpy()


def _fmt(x: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:{width}.2f}"


def format_report(result: dict[str, Any]) -> str:
    """The result of :func:`evaluate` as a plain-text table."""
    task, m = result["task"], result["metrics"]
    lines = [f"{task} evaluation of {result['model']} on {result['num_images']} image(s) from {result['data']}", ""]
    if task == "panoptic":
        lines.append(f"{'':8}{'PQ':>7}{'SQ':>7}{'RQ':>7}{'#cat':>6}")
        for split in ("all", "things", "stuff"):
            s = m[split]
            lines.append(f"{split.capitalize():8}{_fmt(s['pq'])}{_fmt(s['sq'])}{_fmt(s['rq'])}{s['n']:6d}")
        lines += ["", f"{'id':>4}  {'category':20}{'PQ':>7}{'SQ':>7}{'RQ':>7}{'TP':>6}{'FP':>6}{'FN':>6}"]
        for cid, c in m["per_class"].items():
            kind = "" if c["isthing"] else " (stuff)"
            name = (str(c["name"]) + kind)[:20]
            lines.append(
                f"{cid:>4}  {name:20}{_fmt(c['pq'])}{_fmt(c['sq'])}{_fmt(c['rq'])}{c['tp']:6d}{c['fp']:6d}{c['fn']:6d}"
            )
    elif task == "instance":
        names = metrics.AP_NAMES
        lines.append("".join(f"{n:>7}" for n in names))
        lines.append("".join(_fmt(m[n]) for n in names))
        lines.append(f"\n{m['num_predictions']} scored prediction(s)")
    else:
        lines.append(f"{'mIoU':>7}{'pAcc':>7}{'mAcc':>7}{'#cls':>6}")
        lines.append(f"{_fmt(m['mIoU'])}{_fmt(m['pixel_accuracy'])}{_fmt(m['mean_accuracy'])}{m['n']:6d}")
        lines += ["", f"{'id':>4}  {'class':20}{'IoU':>7}"]
        for cid, iou in m["per_class"].items():
            lines.append(f"{cid:>4}  {str(m['names'].get(cid, cid))[:20]:20}{_fmt(iou)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``m2f eval``: load the checkpoint (or the ``--onnx`` file), evaluate, print a table (or JSON with ``--json``)."""
    if getattr(args, "onnx", None) is not None:
        from service.onnx_runtime import OnnxRunner

        model = OnnxRunner(args.onnx)
    else:
        from mask2former import load_model

        model = load_model(args.weights, device=args.device, labels=getattr(args, "labels", None))
    result = evaluate(model, args.data, args.task, batch_size=args.batch_size, limit=args.limit)
    print(json.dumps(result) if args.json else format_report(result))
    return 0
