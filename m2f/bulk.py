"""``m2f batch``: segment a large image set with Ray Data, embedded on one machine or on a Ray cluster.

The pipeline is the service's, step for step (:mod:`pipeline.steps`), as Ray Data operators:

1. read bytes (any filesystem, :mod:`m2f.bulk_io`), decode and prepare: CPU tasks
   (:func:`pipeline.steps.decode`, :func:`pipeline.steps.prepare`); an image that cannot be read or
   decoded becomes an error row, recorded in ``errors.jsonl``, and the job goes on;
2. inference: a pool of actors, each holding one runner (:func:`runtimes.open_runner`, PyTorch or
   ONNX Runtime); each call groups its images by padded size with the service's
   :class:`~service.scheduler.BatchPolicy` and pads each batch to its largest member, as the service does;
3. post-processing and COCO RLE: CPU tasks (:func:`pipeline.steps.answer`);
4. the driver streams the results in input order and writes each shard (COCO JSON or Parquet) when its last
   image arrives, then the shard's marker. Writing on the driver keeps a local ``--output`` right when the
   workers run on other machines; the heavy steps all run on the workers.

A shard is the images ``[k * shard_size, (k + 1) * shard_size)`` of the sorted listing; image ids are their
positions. A re-run with the same inputs and settings skips shards with a marker, so an interrupted job
resumes and every image is written exactly once. ``_SUCCESS`` marks a finished job. Ray is imported
lazily: it is an optional heavy dependency (the ``batch`` extra); the rest of the package runs without it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from m2f import bulk_io
from m2f.bulk_io import ERRORS, FORMATS, Folder, Source, shard_name
from model_format.metadata import read_metadata
from pipeline import steps
from pipeline.batch import BatchPolicy, Item, assemble, choose_batch_size, describe_profile, profile_batches
from pipeline.config import Mask2FormerConfig, preprocess_to_hf, read_config
from pipeline.postprocess import TASKS
from runtimes import open_runner, typical_size

IDENTITY = ("num_images", "listing_sha256", "model", "runtime", "task", "format", "shard_size")
IDENTITY += ("threshold", "overlap_mask_area_threshold", "max_instances")
MAX_PIXELS = 40_000_000  # the service's default limit
DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "demo"  # mask2former.weights'; that imports torch
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- model and plan
def model_spec(model: str | None, runtime: str) -> tuple[Mask2FormerConfig, tuple[int | str, ...], str]:
    """(config, input shape (B, 3, H, W) with names for dynamic axes, runtime) of a model, read from its files
    without opening a runtime: the driver needs the labels and preprocessing, the actors run the model."""
    if runtime == "auto":
        runtime = "onnxruntime" if model is not None and str(model).endswith(".onnx") else "torch"
    if runtime == "onnxruntime":
        if model is None:
            raise ValueError("the onnxruntime runtime needs an .onnx file (export one with `m2f export onnx`)")
        meta = read_metadata(model)
        return meta.to_config(), tuple(meta.input_shape), runtime
    if runtime != "torch":
        raise ValueError(f"unknown runtime {runtime!r}; choose auto, torch or onnxruntime")
    path = Path(model) if model is not None else DEMO_WEIGHTS
    if path.is_file():
        from mask2former.detectron2 import read_detectron2  # lazy: torch

        config = read_detectron2(path, None)[0]
    else:
        config = read_config(path)
    return config, ("batch", 3, "height", "width"), runtime


@dataclass(frozen=True)
class Plan:
    """How the job uses the cluster: inference actors, their threads and Ray resources, images per batch."""

    actors: int
    threads: int | None  # intra-op threads of each actor's runner (None: the runtime's choice)
    batch_size: int  # with ``profile``: the largest batch each actor may choose
    actor_cpus: float  # Ray CPUs each actor reserves; the rest run decoding and post-processing
    actor_gpus: float
    profile: bool = False  # actors time batches of 1, 2, 4, ... and keep the largest that pays (as the service)


def plan_resources(
    device: str,
    cluster_cpus: float,
    node_cpus: float,
    cluster_gpus: float,
    actors: int | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
) -> Plan:
    """Defaults from the machine: on GPUs one actor per GPU (batches of 8); on CPUs one actor per 8 cores of
    a node, with the node's cores less one per actor as its threads, and batches of up to 8 chosen by each
    actor from its own timing (``profile``: a batch only where it raises images/s): the spare cores decode and
    post-process. Actors reserve their threads in Ray CPUs, but leave at least one CPU of the cluster to those
    tasks (an intra-op thread pool on cores that other work also wants is much slower than one thread fewer: its
    threads wait for each other)."""
    nodes = max(1, round(cluster_cpus / node_cpus)) if node_cpus else 1
    if device.startswith("cuda"):
        if cluster_gpus < 1:
            raise ValueError(f"--device {device}, but the Ray cluster has no GPU")
        actors = actors or int(cluster_gpus)
        threads = threads or 2
        gpus = min(1.0, cluster_gpus / actors)
        return Plan(actors, threads, batch_size or 8, max(0.0, min(1.0, (cluster_cpus - 1) / actors)), gpus)
    actors = actors or nodes * max(1, int(node_cpus) // 8)
    per_node = math.ceil(actors / nodes)
    threads = threads or max(1, int(node_cpus) // per_node - 1)
    cpus = max(0.0, min(threads, (cluster_cpus - 1) / actors))
    return Plan(actors, threads, batch_size or 8, cpus, 0.0, profile=batch_size is None)


# ---------------------------------------------------------------------------------------------- Ray stages
def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """One batch column: stacked when every array has the same shape, else an object array (ragged)."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def prepare_image(row: dict[str, Any], config: Mask2FormerConfig, fixed_size: tuple[int, int] | None, max_pixels: int):
    """One path -> [its prepared image] (CPU task). An unreadable image gets an empty one and its ``error``."""
    out = {"image_id": row["image_id"], "resized": np.zeros(2, np.int64), "original": np.zeros(2, np.int64)}
    try:
        image = steps.decode(bulk_io.read_bytes(str(row["path"])), max_pixels)
        p = steps.prepare(image, config, fixed_size)
    except (OSError, ValueError) as e:  # missing, unreadable, not an image, truncated, zero-size, too large
        return [{**out, "pixels": np.zeros((3, 0, 0), np.float32), "error": f"{type(e).__name__}: {e}"}]
    out["resized"][:], out["original"][:] = p.resized_size, p.original_size
    return [{**out, "pixels": p.pixels, "error": ""}]  # pixels (3, h, w)


class Infer:
    """An inference actor: one runner; each call batches its images by padded size as the service does."""

    def __init__(
        self,
        model: str | None,
        runtime: str,
        device: str,
        threads: int | None,
        batch_size: int,
        bucket_px: int,
        profile: bool = False,
    ):
        self.runner = open_runner(model, runtime, device, threads)
        spec = self.runner.input
        self.fixed_batch = spec.batch
        if profile and spec.batch is None and batch_size > 1:
            size = spec.size or typical_size(self.runner.config)
            seconds = profile_batches(self.runner.run, size, batch_size)
            batch_size = choose_batch_size(seconds)  # no latency limit: a bulk job wants images/s
            log.info(
                "batch profile at %dx%d, seconds per image (each round): %s -> batch size %d",
                *size,
                describe_profile(seconds),
                batch_size,
            )
        self.policy = BatchPolicy(
            max_batch_size=spec.batch or batch_size,
            max_delay_s=0.0,
            bucket_px=bucket_px,
            size_divisor=self.runner.config.preprocess.size_divisor,
            fixed_size=spec.size,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        class_logits = [np.zeros((0, 0), np.float32)] * n  # error rows keep these empty arrays
        mask_logits = [np.zeros((0, 0, 0), np.float32)] * n
        index: dict[Item, int] = {}
        for i in range(n):
            if not batch["error"][i]:
                h, w = (int(v) for v in batch["resized"][i])
                item = Item(np.asarray(batch["pixels"][i]), (h, w), seq=i)
                index[item] = i
                self.policy.add(item, 0.0)
        while (group := self.policy.next_batch(math.inf)) is not None:  # by bucket, oldest first
            cl, ml = self.runner.run(assemble(group, self.policy.padded_size(group), self.fixed_batch))
            for j, item in enumerate(group):  # cl (B, Q, K+1), ml (B, Q, Hp/4, Wp/4)
                class_logits[index[item]], mask_logits[index[item]] = cl[j], ml[j]
        return {
            "image_id": batch["image_id"],
            "class_logits": _column(class_logits),
            "mask_logits": _column(mask_logits),
            "resized": batch["resized"],
            "original": batch["original"],
            "error": batch["error"],
        }


def answer_batch(
    batch: dict[str, np.ndarray], task: str, config: Mask2FormerConfig, params: dict[str, Any], png: bool
) -> dict[str, np.ndarray]:
    """Logits -> the service's JSON answer per image (CPU task), and the panoptic PNG when asked."""
    records, pngs = [], []
    for i in range(len(batch["image_id"])):
        if batch["error"][i]:
            records.append("")
            pngs.append(b"")
            continue
        resized = tuple(int(v) for v in batch["resized"][i])
        original = tuple(int(v) for v in batch["original"][i])
        prepared = steps.Prepared(np.zeros((3, 0, 0), np.float32), resized, original)  # sizes only
        cl, ml = np.asarray(batch["class_logits"][i]), np.asarray(batch["mask_logits"][i])
        answer = steps.answer(task, config, prepared, cl, ml, png=png, **params)
        encoded = answer.pop("png")
        records.append(json.dumps(answer))
        pngs.append(base64.b64decode(encoded) if encoded else b"")
    return {
        "image_id": batch["image_id"],
        "record": np.array(records, dtype=object),
        "png": np.array(pngs, dtype=object),
        "error": batch["error"],
    }


# ---------------------------------------------------------------------------------------------- Ray session
def import_ray() -> Any:
    """``ray`` with ``ray.data``: an optional heavy dependency (the ``batch`` extra), imported when a job runs.
    Usage statistics are off unless the environment says otherwise."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray  # lazy: ray (the batch extra)
        import ray.data  # noqa: F401  # lazy: ray
    except ImportError:
        raise ValueError("m2f batch needs Ray Data: pip install 'mask2former-serve[batch]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """The Ray module, connected: an existing session as it is, else ``address`` (a cluster), else a local
    Ray started here and stopped at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _data_context(ray: Any) -> Iterator[None]:
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # shards finish in turn: the driver holds one or two at a time
    ctx.enable_progress_bars = False  # ours counts images over the whole job (images/s, ETA)
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def cluster_plan(ray: Any, device: str, **overrides: Any) -> Plan:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    total = ray.cluster_resources()
    node_cpus = min((n["CPU"] for n in nodes), default=total.get("CPU", 1))
    return plan_resources(device, total.get("CPU", 1), node_cpus, total.get("GPU", 0), **overrides)


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class Job:
    """One output folder's job: its inputs, settings and shards."""

    folder: Folder
    sources: list[Source]
    doc: dict[str, Any]  # _job.json
    config: Mask2FormerConfig

    @property
    def shard_size(self) -> int:
        return self.doc["shard_size"]

    @property
    def num_shards(self) -> int:
        return -(-len(self.sources) // self.shard_size)

    def shard_ids(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.sources)))

    def finished(self) -> set[int]:
        names = self.folder.names("_shards")
        return {int(n[len("shard-") : -len(".json")]) for n in names if n.startswith("shard-") and n.endswith(".json")}

    def markers(self) -> list[dict[str, Any]]:
        return [self.folder.read_json(f"_shards/{shard_name(k)}.json") for k in sorted(self.finished())]


def job_doc(
    input: str,
    sources: list[Source],
    model: str | None,
    runtime: str,
    config: Mask2FormerConfig,
    task: str,
    format: str,
    shard_size: int,
    params: dict[str, Any],
) -> dict[str, Any]:
    """``_job.json``: what the job is (``IDENTITY``: a resumed job must match) and the labels it wrote."""
    local_model = model is not None and not bulk_io.has_scheme(str(model))
    return {
        "num_images": len(sources),
        "listing_sha256": bulk_io.listing_digest(sources),
        "model": os.path.abspath(model) if local_model else model,
        "runtime": runtime,
        "task": task,
        "format": format,
        "shard_size": shard_size,
        **params,  # threshold, overlap_mask_area_threshold, max_instances
        "input": input,
        "model_name": config.name,
        "config": config.to_hf_dict(),
        "preprocessor": preprocess_to_hf(config.preprocess),
    }


def open_job(output: str, sources: list[Source], doc: dict[str, Any], config: Mask2FormerConfig) -> Job:
    """The job in ``output``: a new one (writes ``_job.json`` and ``images.json``), or the same job again to
    resume; another job's folder is refused."""
    folder = Folder(output)
    if folder.exists("_job.json"):
        old = folder.read_json("_job.json")
        diff = [f"{k} {old.get(k)!r} -> {doc[k]!r}" for k in IDENTITY if old.get(k) != doc[k]]
        if diff:
            raise ValueError(f"{output} holds another job ({'; '.join(diff)}); choose a new --output folder")
        return Job(folder, sources, old, config)
    images = [{"id": i, "file_name": s.file_name, "path": s.uri} for i, s in enumerate(sources)]
    folder.write_json("images.json", {"images": images})
    folder.write_json("_job.json", doc)
    return Job(folder, sources, doc, config)


def image_record(job: Job, image_id: int, answer: dict[str, Any]) -> dict[str, Any]:
    s = job.sources[image_id]
    return {"image_id": image_id, "file_name": s.file_name, "path": s.uri, **answer}


def write_shard(job: Job, shard: int, records: list[dict[str, Any]], errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A finished shard's results, then its marker (a shard without a marker is done again on a re-run)."""
    records = sorted(records, key=lambda r: r["image_id"])
    name = shard_name(shard)
    if job.doc["format"] == "coco":
        job.folder.write_json(f"{name}.json", bulk_io.coco_shard(job.doc["task"], records, job.config))
    else:
        job.folder.write(f"{name}.parquet", bulk_io.parquet_shard(records))
    marker = {
        "shard": shard,
        "images": len(records),
        "segments": sum(len(r["segments"]) for r in records),
        "errors": sorted(errors, key=lambda e: e["image_id"]),
    }
    job.folder.write_json(f"_shards/{name}.json", marker)
    return marker


def _dataset(ray: Any, job: Job, ids: list[int], plan: Plan, settings: dict[str, Any], fixed: tuple) -> Any:
    rows = [{"image_id": i, "path": job.sources[i].uri} for i in ids]
    blocks = max(1, min(-(-len(rows) // plan.batch_size), 2000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    fixed_size = (fixed[2], fixed[3]) if isinstance(fixed[2], int) and isinstance(fixed[3], int) else None
    # A flat map (one row in, one out) and not map_batches: Ray Data keeps a stage that may change the row
    # count apart from a batched actor stage, so decoding runs in tasks of its own, in parallel, and not
    # inside the inference actors between forward passes (it fuses map_batches tasks into the next actors).
    ds = ds.flat_map(
        prepare_image,
        num_cpus=1,
        fn_kwargs={"config": job.config, "fixed_size": fixed_size, "max_pixels": settings["max_pixels"]},
    )
    ds = ds.map_batches(
        Infer,
        batch_size=plan.batch_size * 4,  # several model batches per call: images of a size find each other
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        fn_constructor_kwargs={
            "model": settings["model"],
            "runtime": job.doc["runtime"],
            "device": settings["device"],
            "threads": plan.threads,
            "batch_size": plan.batch_size,
            "bucket_px": settings["bucket_px"],
            "profile": plan.profile,
        },
    )
    task = job.doc["task"]
    params = {k: job.doc[k] for k in ("threshold", "overlap_mask_area_threshold", "max_instances")}
    png = task == "panoptic" and job.doc["format"] == "coco"
    return ds.map_batches(
        answer_batch,
        batch_size=plan.batch_size,
        batch_format="numpy",
        num_cpus=1,
        fn_kwargs={"task": task, "config": job.config, "params": params, "png": png},
    )


def _collect(job: Job, ds: Any, total: int, progress: bool) -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
    """Stream the results, write PNGs as they come and each shard when complete; the new shards' markers and
    the timeline (images done, ``time.perf_counter``) after each batch of results."""
    records: dict[int, list[dict[str, Any]]] = {}
    errors: dict[int, list[dict[str, Any]]] = {}
    seen: dict[int, int] = {}
    markers, timeline = [], []
    with tqdm(total=total, desc="m2f batch", unit="img", file=sys.stderr, disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for image_id, record, png, error in zip(batch["image_id"], batch["record"], batch["png"], batch["error"]):
                image_id = int(image_id)
                shard = image_id // job.shard_size
                if error:
                    s = job.sources[image_id]
                    errors.setdefault(shard, []).append(
                        {"image_id": image_id, "file_name": s.file_name, "path": s.uri, "error": str(error)}
                    )
                else:
                    records.setdefault(shard, []).append(image_record(job, image_id, json.loads(record)))
                    if len(png):
                        job.folder.write(bulk_io.panoptic_png_name(image_id), bytes(png))
                seen[shard] = seen.get(shard, 0) + 1
                if seen[shard] == len(job.shard_ids(shard)):
                    markers.append(write_shard(job, shard, records.pop(shard, []), errors.pop(shard, [])))
            bar.update(len(batch["image_id"]))
            timeline.append((bar.n, time.perf_counter()))
    return markers, timeline


def finish(job: Job, summary: dict[str, Any]) -> None:
    """All shards done: ``errors.jsonl`` (every shard's errors, by image id), then ``_SUCCESS``."""
    errors = [e for m in job.markers() for e in m["errors"]]
    job.folder.write(ERRORS, "".join(json.dumps(e) + "\n" for e in errors).encode())
    job.folder.write_json("_SUCCESS", summary)


def run_batch(
    input: str,
    output: str,
    model: str | None = None,
    runtime: str = "auto",
    device: str = "cpu",
    task: str | None = None,
    format: str = "coco",
    address: str | None = None,
    num_cpus: int | None = None,
    shard_size: int = 1000,
    batch_size: int | None = None,
    actors: int | None = None,
    threads: int | None = None,
    bucket_px: int = 128,
    threshold: float | None = None,
    overlap_mask_area_threshold: float | None = None,
    max_instances: int = 100,
    max_pixels: int = MAX_PIXELS,
    max_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment every image of ``input`` into ``output`` (see the module docstring); returns the summary.

    ``task`` defaults to the model's (panoptic with things and stuff); ``threshold`` and
    ``overlap_mask_area_threshold`` to the checkpoint's; ``max_shards`` stops after that many new shards.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if shard_size < 1 or max_instances < 1 or (max_shards is not None and max_shards < 0):
        raise ValueError("shard size and max instances must be at least 1, max shards at least 0")
    started = time.perf_counter()
    sources = bulk_io.list_inputs(input)
    if not sources:
        raise ValueError(f"no images in {input} (looked for {', '.join(bulk_io.IMAGE_SUFFIXES)})")
    config, shape, runtime = model_spec(model, runtime)
    task = task or steps.default_task(config)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    params = {"threshold": threshold, "overlap_mask_area_threshold": overlap_mask_area_threshold}
    params["max_instances"] = max_instances
    doc = job_doc(input, sources, model, runtime, config, task, format, shard_size, params)
    job = open_job(output, sources, doc, config)
    done = job.finished()
    todo = [k for k in range(job.num_shards) if k not in done][:max_shards]
    ids = [i for k in todo for i in job.shard_ids(k)]
    new: list[dict[str, Any]] = []
    timeline: list[tuple[int, float]] = []
    if ids:
        settings = {"model": model, "device": device, "bucket_px": bucket_px, "max_pixels": max_pixels}
        with ray_session(address, num_cpus) as ray, _data_context(ray):
            plan = cluster_plan(ray, device, actors=actors, threads=threads, batch_size=batch_size)
            new, timeline = _collect(job, _dataset(ray, job, ids, plan, settings, shape), len(ids), progress)
    wall = time.perf_counter() - started
    return _summary(job, new, len(done), wall, _first_result_s(timeline, started))


def _first_result_s(timeline: list[tuple[int, float]], started: float) -> float | None:
    """When the first results came: start-up (Ray, the actors, the model) and the first batch. No rate is
    derived from the deliveries: Ray Data hands results over in bursts, which makes any window between them
    meaningless as a throughput (bench/batch.py measures the rate without start-up from two job sizes)."""
    return round(timeline[0][1] - started, 3) if timeline else None


def _summary(
    job: Job, new: list[dict[str, Any]], skipped: int, wall: float, first_result_s: float | None
) -> dict[str, Any]:
    markers = job.markers()
    complete = len(markers) == job.num_shards
    count = sum(m["images"] + len(m["errors"]) for m in new)
    summary = {
        "output": job.folder.uri,
        "task": job.doc["task"],
        "format": job.doc["format"],
        "complete": complete,
        "images": len(job.sources),
        "shards": job.num_shards,
        "shards_done": len(markers),
        "segments": sum(m["segments"] for m in markers),
        "errors": sum(len(m["errors"]) for m in markers),
        "this_run": {
            "images": count,
            "shards": len(new),
            "skipped_shards": skipped,
            "segments": sum(m["segments"] for m in new),
            "errors": sum(len(m["errors"]) for m in new),
            "wall_s": round(wall, 3),
            "images_per_s": round(count / wall, 3) if wall > 0 else None,
            "first_result_s": first_result_s,
        },
    }
    if complete and (new or not job.folder.exists("_SUCCESS")):
        finish(job, summary)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    r = s["this_run"]
    rate = f"{r['images_per_s']:.2f}" if r["images_per_s"] is not None else "-"
    start = f" (first results after {r['first_result_s']:.1f} s)" if r["first_result_s"] is not None else ""
    lines = [
        f"this run: {r['images']} image(s) in {r['shards']} shard(s) ({r['skipped_shards']} already done) in "
        f"{r['wall_s']:.1f} s{start}, {rate} images/s; {r['segments']} segment(s), {r['errors']} error(s)",
        f"job: {s['images']} image(s), {s['shards_done']}/{s['shards']} shard(s) done, {s['segments']} segment(s), "
        f"{s['errors']} error(s); {s['task']} as {s['format']} in {s['output']}",
    ]
    if s["complete"]:
        lines.append("complete (_SUCCESS)" + (f"; unreadable images are listed in {ERRORS}" if s["errors"] else ""))
    else:
        lines.append("not complete: run the same command again to continue")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``m2f batch``: run (or resume) the job and print the summary."""
    import_ray()  # it sets up its loggers on import; then:
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not each dataset's plan and log folder
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # ours replaces Ray Data's bars
    summary = run_batch(
        args.input,
        args.output,
        model=None if args.model is None else str(args.model),
        runtime=args.runtime,
        device=args.device,
        task=args.task,
        format=args.format,
        address=args.address,
        num_cpus=args.num_cpus,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        actors=args.actors,
        threads=args.threads,
        bucket_px=args.bucket_px,
        threshold=args.threshold,
        overlap_mask_area_threshold=args.overlap_mask_area_threshold,
        max_instances=args.max_instances,
        max_pixels=args.max_pixels,
        max_shards=args.max_shards,
        progress=not args.no_progress,
    )
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0
