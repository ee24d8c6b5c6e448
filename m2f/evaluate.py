"""``m2f eval``: run a checkpoint over a COCO-style dataset and score it (PQ, mask AP or mIoU).

The dataset folder (what ``m2f synth`` writes; COCO conventions, category ids = the model's label ids)::

    images/<file_name>          the images listed in the JSON files
    panoptic.json               COCO panoptic: images, annotations (segments_info), categories (isthing)
    panoptic/<file_name>.png    COCO panoptic PNGs: id = R + 256 G + 256^2 B, 0 = void
    instances.json              COCO instances (things only), RLE or polygon segmentations
    semantic/<image stem>.png   uint8 class ids, 255 = void

or COCO's layout for one split (``val2017/``, ``annotations/panoptic_val2017.json`` and its PNG folder,
``annotations/instances_val2017.json``), with categories matched to the model's labels by name where the ids
differ (:mod:`m2f.eval_data`). Without semantic PNGs, mIoU is scored on class maps painted from the
panoptic ground truth.

The pipeline is the serving one: :func:`~pipeline.processing.load_image`, batched
:func:`~pipeline.processing.preprocess`, the model (PyTorch, or a runner such as ONNX Runtime's), and the
task's post-processing (:func:`pipeline.steps.postprocess`, numpy) with the checkpoint's defaults (panoptic: the config's ``threshold``, ``mask_threshold``
and ``overlap_mask_area_threshold``; instance: threshold 0.0 and the top 100 pairs). The metrics and their
conventions are in :mod:`m2f.metrics`.
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
from pycocotools import mask as mask_util
from tqdm import tqdm

from m2f import metrics
from m2f.bulk_io import Predictions
from m2f.eval_data import DatasetLayout, find_layout, label_ids
from m2f.eval_images import class_map
from pipeline import steps
from pipeline.postprocess import TASKS
from pipeline.processing import load_image, preprocess

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


def _layout(data: str | Path | DatasetLayout) -> DatasetLayout:
    return data if isinstance(data, DatasetLayout) else find_layout(data)


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
    """Per-task dataset reading and metric accumulation; ``add`` takes one image's post-processed result
    (and, optionally, its ground truth as :meth:`ground_truth` returns it, to read it once for several models)."""

    images: list[_Image]

    def ground_truth(self, image: _Image) -> Any:
        return None

    def add(self, image: _Image, result: Any, gt: Any = None) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError


class _Panoptic(_Task):
    def __init__(self, data: str | Path | DatasetLayout, config) -> None:
        layout = _layout(data)
        json_path = layout.panoptic_json or layout.root / "panoptic.json"
        dataset = _read_json(json_path)
        self.root = layout.panoptic_dir or json_path.with_suffix("")
        categories = dataset.get("categories", [])
        self.to_label = label_ids(categories, config, json_path.name)  # dataset category id -> label id
        self.categories = [{**c, "id": self.to_label[int(c["id"])]} for c in categories]
        unknown = sorted(set(range(config.num_labels)) - {int(c["id"]) for c in self.categories})
        if unknown:  # a prediction of such a label could not be scored (panopticapi refuses it too)
            raise ValueError(f"the model's labels {unknown} are not among {json_path.name}'s categories")
        self.annotations = {int(a["image_id"]): a for a in dataset.get("annotations", [])}
        self.images = _images(dataset)
        missing = [im.id for im in self.images if im.id not in self.annotations]
        if missing:
            raise ValueError(f"{json_path.name} has no annotation for image ids {missing[:10]}")
        self.pq = metrics.PanopticQuality(self.categories)

    def ground_truth(self, image: _Image) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(H, W) segment ids and segments_info, category ids as the model's label ids."""
        ann = self.annotations[image.id]
        segments = [{**s, "category_id": self.to_label[int(s["category_id"])]} for s in ann["segments_info"]]
        return read_id_map(self.root / ann["file_name"]), segments

    def add(self, image: _Image, result, gt=None) -> None:
        gt_map, gt_segments = gt if gt is not None else self.ground_truth(image)
        pred_map = result.segmentation
        pred_segments = [{"id": s.id, "category_id": s.label_id} for s in result.segments]
        self.pq.update(gt_map, gt_segments, pred_map, pred_segments)

    def compute(self) -> dict[str, Any]:
        return self.pq.compute()


class _Instance(_Task):
    def __init__(self, data: str | Path | DatasetLayout, config) -> None:
        layout = _layout(data)
        json_path = layout.instances_json or layout.root / "instances.json"
        self.dataset = _read_json(json_path)
        to_label = label_ids(self.dataset.get("categories", []), config, json_path.name)
        self.to_category = {label: cat for cat, label in to_label.items()}  # label id -> dataset category id
        self.images = _images(self.dataset)
        self.predictions: list[dict[str, Any]] = []

    def add(self, image: _Image, result, gt=None) -> None:

        labels = result.labels
        keep = np.isin(labels, list(self.to_category))  # other labels (stuff) are not scored by COCOeval
        masks = result.masks[keep]  # (N, H, W) bool
        if len(masks) == 0:
            return
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for rle, label, score in zip(rles, labels[keep].tolist(), result.scores[keep].tolist()):
            rle["counts"] = rle["counts"].decode("ascii")
            category = self.to_category[label]
            self.predictions.append(
                {"image_id": image.id, "category_id": category, "segmentation": rle, "score": score}
            )

    def compute(self) -> dict[str, Any]:
        return metrics.mask_ap(self.dataset, self.predictions, image_ids=[im.id for im in self.images])


class _Semantic(_Task):
    """Semantic PNGs (label ids, 255 = void); without them, class maps derived from the panoptic ground truth
    (every segment, crowd ones too, painted with its category; void stays 255)."""

    def __init__(self, data: str | Path | DatasetLayout, config) -> None:
        layout = _layout(data)
        self.root = layout.semantic_dir or layout.root / "semantic"
        self.panoptic = None
        if layout.semantic_dir is None and layout.panoptic_json is not None:
            self.panoptic = _Panoptic(layout, config)
            self.images = self.panoptic.images
        elif layout.panoptic_json or layout.instances_json:
            self.images = _images(_read_json(layout.panoptic_json or layout.instances_json))
        else:  # no JSON: every semantic map with an image of the same stem
            by_stem = {p.stem: p.name for p in sorted(layout.images.glob("*")) if p.is_file()}
            stems = [p.stem for p in sorted(self.root.glob("*.png"))]
            self.images = [_Image(i, by_stem[s], None, None) for i, s in enumerate(stems) if s in by_stem]
        self.miou = metrics.MeanIoU(config.num_labels, ignore_index=255)
        self.names = dict(config.id2label)

    def ground_truth(self, image: _Image) -> np.ndarray:
        """(H, W) label ids, 255 = void."""
        if self.panoptic is None:
            return read_label_map(self.root / (Path(image.file_name).stem + ".png"))
        id_map, segments = self.panoptic.ground_truth(image)
        labels = class_map(id_map, [(int(s["id"]), int(s["category_id"])) for s in segments])
        return np.where(labels < 0, 255, labels)

    def add(self, image: _Image, result, gt=None) -> None:
        self.miou.update(self.ground_truth(image) if gt is None else gt, result)

    def compute(self) -> dict[str, Any]:
        out = self.miou.compute()
        out["names"] = {c: self.names.get(c, str(c)) for c in out["per_class"]}
        return out


SCORERS: dict[str, type[_Task]] = {"panoptic": _Panoptic, "instance": _Instance, "semantic": _Semantic}


def evaluate(
    model,
    data_dir: str | Path,
    task: str,
    batch_size: int = 4,
    limit: int | None = None,
    progress: bool = True,
    split: str | None = None,
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
        split: the split of a COCO-layout folder (:func:`~m2f.eval_data.find_layout`).

    Returns:
        ``{"task", "model", "data", "num_images", "metrics"}``, ``metrics`` being what
        :func:`~m2f.metrics.panoptic_quality`, :func:`~m2f.metrics.mask_ap` or
        :func:`~m2f.metrics.mean_iou` return.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    data_dir = Path(data_dir)
    layout = find_layout(data_dir, split)
    cfg = model.config
    scorer: _Task = SCORERS[task](layout, cfg)
    images = scorer.images[:limit] if limit is not None else scorer.images
    scorer.images = images
    if not images:
        raise ValueError(f"no images to evaluate in {data_dir}")
    with tqdm(total=len(images), desc=f"eval {task}", unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = preprocess(load_images(layout, chunk), cfg.preprocess)
            class_logits, mask_logits = run_model(model, batch.pixel_values)
            params = {"max_instances": MAX_INSTANCES} if task == "instance" else {}
            results = steps.postprocess(
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


def load_images(layout: DatasetLayout, chunk: list[_Image]) -> list[Image.Image]:
    """The images of ``chunk`` (RGB, EXIF applied), checked against the sizes their JSON gives."""
    pil_images = [load_image(layout.images / im.file_name) for im in chunk]
    for im, pil in zip(chunk, pil_images):
        if im.width is not None and im.height is not None and pil.size != (int(im.width), int(im.height)):
            raise ValueError(f"{im.file_name} is {pil.size[0]}x{pil.size[1]} but the JSON says {im.width}x{im.height}")
    return pil_images


def evaluate_predictions(
    predictions: str | Path,
    data_dir: str | Path,
    task: str | None = None,
    limit: int | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Score a finished ``m2f batch`` output against the dataset in ``data_dir``, through the same scorers as
    :func:`evaluate` (the results are read back from the output's PNGs or RLEs).

    Predictions are matched to the dataset's images by ``file_name`` (the path relative to the batch input,
    or one ending in ``/<file_name>``). Every scored image needs a prediction. ``task`` must be the job's;
    ``split`` chooses the split of a COCO-layout folder, as for :func:`evaluate`.
    """
    preds = Predictions(str(predictions))
    if task is not None and task != preds.task:
        raise ValueError(f"{predictions} holds {preds.task} predictions; evaluate them with --task {preds.task}")
    data_dir = Path(data_dir)
    scorer: _Task = SCORERS[preds.task](find_layout(data_dir, split), preds.config)
    images = scorer.images[:limit] if limit is not None else scorer.images
    scorer.images = images
    by_suffix = {}
    for name, image_id in preds.names.items():
        parts = name.split("/")
        for i in range(len(parts)):
            by_suffix.setdefault("/".join(parts[i:]), image_id)
    ids = {im.file_name: by_suffix.get(im.file_name) for im in images}
    missing = [name for name, i in ids.items() if i is None or i not in preds]
    if missing:
        raise ValueError(f"{predictions} has no prediction for {len(missing)} image(s) of {data_dir}: {missing[:5]}")
    for im in images:
        scorer.add(im, preds.result(ids[im.file_name]))
    return {
        "task": preds.task,
        "model": preds.config.name,
        "data": str(data_dir),
        "predictions": str(predictions),
        "num_images": len(images),
        "metrics": scorer.compute(),
    }


def run_model(model, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class_logits, mask_logits) as float32 numpy from a PyTorch model, or from a runner with
    ``run(pixel_values)`` (:mod:`runtimes`); a graph with a fixed batch or image size gets the batch in
    chunks of its size and the images zero-padded to it (as preprocessing pads), the outputs cut back."""
    if hasattr(model, "run"):
        spec = getattr(model, "input", None)
        if spec is None or (spec.batch is None and spec.size is None):
            return model.run(pixel_values)
        return _run_fixed(model, pixel_values, spec.batch, spec.size)
    import torch  # lazy: torch (runners need no torch)

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(torch.from_numpy(pixel_values).to(device))
    return out.class_logits.float().cpu().numpy(), out.mask_logits.float().cpu().numpy()


def _run_fixed(
    runner, pixel_values: np.ndarray, batch: int | None, size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    b, _, h, w = pixel_values.shape  # (B, 3, H, W)
    if size is not None:
        if h > size[0] or w > size[1]:
            raise ValueError(
                f"images padded to {h}x{w} do not fit the graph's fixed {size[0]}x{size[1]} input: export it with "
                "--dynamic-shape, or at a size that holds the dataset's images"
            )
        pixel_values = np.pad(pixel_values, ((0, 0), (0, 0), (0, size[0] - h), (0, size[1] - w)))
    step = batch or b
    outs = []
    for start in range(0, b, step):
        chunk = pixel_values[start : start + step]
        n = len(chunk)
        if n < step:  # a short last chunk: fill with zero images, drop their outputs
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        class_logits, mask_logits = runner.run(chunk)
        outs.append((class_logits[:n], mask_logits[:n]))
    return np.concatenate([c for c, _ in outs]), np.concatenate([m for _, m in outs])


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
    if getattr(args, "predictions", None) is not None:
        split = getattr(args, "split", None)
        result = evaluate_predictions(args.predictions, args.data, args.task, limit=args.limit, split=split)
        print(json.dumps(result) if args.json else format_report(result))
        return 0
    if getattr(args, "onnx", None) is not None:
        from runtimes.onnx_runner import OnnxRunner  # lazy: onnxruntime

        model = OnnxRunner(args.onnx)
    else:
        from mask2former import load_model  # lazy: torch

        model = load_model(args.weights, device=args.device, labels=getattr(args, "labels", None))
    split = getattr(args, "split", None)
    result = evaluate(model, args.data, args.task, batch_size=args.batch_size, limit=args.limit, split=split)
    print(json.dumps(result) if args.json else format_report(result))
    return 0
