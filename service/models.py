"""The models a server serves, by name, and how one version of a model is loaded and measured.

A model is given by name and path (``--model NAME=PATH``, repeatable, or a model repository folder: see
:func:`service.settings.Settings.model_sources`). Each load makes a new :class:`Version` of that name: the runner
opened, warmed up, its batch size profiled (when ``max_batch_size`` is not given) and one request measured at the
checkpoint's typical photo size (decode, forward pass, post-processing). These seed its scheduler lane's seconds
per pixel, and decide once whether CPU work and its forward passes take turns on the cores
(:mod:`service.scheduler`): they do where inference runs on the CPU with every core and a pass is at least
``TURN_RATIO`` times a request's CPU work. Its memory is estimated as the size of its weights (what a runtime
holds beyond them while it runs grows with the images, and is counted with the requests' memory); it counts in
the memory budget while the version is loaded. (The growth of the process' resident set over a load is no
measure of it: the first load also imports the runtime's libraries.)
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import steps
from pipeline.batch import BatchPolicy, Item, assemble, choose_batch_size, describe_profile, profile_batches
from runtimes import Runner, open_runner, typical_size
from runtimes.cpu_class import default_runtime
from runtimes.runner import available_cpus
from service.scheduler import Lane, Rates
from service.settings import DEMO_DIR, Runtime, Settings, runtime_for

log = logging.getLogger("m2f.service")

DEFAULT_MAX_BATCH = 4  # the largest batch the start-up profile tries when max_batch_size is not given
BUCKET_PX = 128  # padded sizes are batched together in steps of this many pixels per side
PHOTO_SIZE = (480, 640)  # (h, w) of the photo start-up measures a request with (most COCO images are 640x480)
# Take turns only where a forward pass per image is at least this many times a request's CPU work: a model
# whose pass dwarfs its CPU steps gains from having the cores alone, one whose steps are comparable loses
# (BENCHMARKS.md, the scheduler).
TURN_RATIO = 8.0
CHECKPOINT_SUFFIXES = (".safetensors", ".bin")  # the weight files of an HF checkpoint folder


@dataclass(eq=False)
class Version:
    """One loaded version of a named model: its runner, what loading measured, and its scheduler lane."""

    name: str
    number: int  # 1, 2, ... per name, in load order
    path: Path | None  # None: the bundled demo checkpoint
    runner: Runner
    lane: Lane
    batch_size: int
    batch_seconds: dict[int, list[float]]  # the profile: seconds of each measured pass by batch size
    load_s: float
    state: str = "ready"  # ready | draining (replaced or unloaded, finishing what it admitted)
    loaded_at: float = field(default_factory=time.time)

    @property
    def resident_bytes(self) -> int:
        return self.lane.resident_bytes

    def describe(self) -> dict[str, Any]:
        """The listing entry of ``GET /v1/models``."""
        cfg = self.runner.config
        return {
            "name": self.name,
            "version": self.number,
            "state": self.state,
            "model": cfg.name,
            "path": None if self.path is None else str(self.path),
            "runtime": self.runner.name,
            "tasks": list(steps.TASKS),
            "default_task": steps.default_task(cfg),
            "labels": len(cfg.id2label),
            "resident_mb": round(self.resident_bytes / 2**20, 1),
            "max_batch_size": self.batch_size,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
        }


def weights_bytes(path: Path | None) -> int:
    """The size of a model's weight files (an .onnx file and its .data, or a checkpoint file or folder; None: the
    bundled demo checkpoint)."""
    path = DEMO_DIR if path is None else path
    if not path.exists():
        return 0
    if path.is_file():
        data = path.with_name(path.name + ".data")
        return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES)


def load_version(
    name: str,
    number: int,
    path: Path | None,
    settings: Settings,
    runner: Runner | None = None,
    runtime: Runtime | None = None,
) -> Version:
    """Open (unless ``runner`` is given; with ``runtime`` if named, else the one the file and the CPU class get),
    warm up, profile and measure one version of model ``name``; blocking. Its lane is made but not yet added to a
    scheduler."""
    s = settings
    t_start = time.perf_counter()
    if runner is None:
        if runtime is not None and (path is None or path.suffix != ".onnx"):
            raise ValueError(f"{path}: only an .onnx file can name its runtime")
        if runtime is None:
            runtime = runtime_for(path)
            if runtime == "onnxruntime" and s.device == "cpu":  # the runner this CPU's class gets (measured table)
                cpu, runtime, why = default_runtime()
                log.info("%s: CPU class %s: runtime %s (%s)", name, cpu, runtime, why)
        runner = open_runner(path, runtime, s.device, s.threads, s.cache_dir)
        log.info("%s: loaded %s (%s) in %.1fs", name, runner.config.name, runner.name, time.perf_counter() - t_start)
    t0 = time.perf_counter()
    runner.warmup()
    log.info("%s: warm-up took %.2fs", name, time.perf_counter() - t0)
    size = runner.input.size or typical_size(runner.config)
    batch_size = runner.input.batch or s.max_batch_size or 1
    batch_seconds: dict[int, list[float]] = {}
    if runner.input.batch is None and s.max_batch_size is None:
        t0 = time.perf_counter()
        batch_seconds = profile_batches(runner.run, size, DEFAULT_MAX_BATCH)
        # Latency limit: one pass may take at most a quarter of the request timeout.
        batch_size = choose_batch_size(batch_seconds, max_batch_s=s.request_timeout_s / 4)
        log.info(
            "%s: batch profile at %dx%d, seconds per image by batch size (each round): %s -> batch size %d (%.1fs)",
            name,
            *size,
            describe_profile(batch_seconds),
            batch_size,
            time.perf_counter() - t0,
        )
    rates, seconds = measure_request(runner, PHOTO_SIZE)
    if batch_seconds:  # the profile's passes are steadier than one
        rates.forward_s_per_px = min(batch_seconds[batch_size]) / batch_size / (size[0] * size[1])
    forward_s = rates.forward_s_per_px * steps.padded_pixels(PHOTO_SIZE, runner.config, runner.input.size)
    all_cores = s.device.startswith("cpu") and (s.threads is None or s.threads >= available_cpus())
    take_turns = all_cores and forward_s >= TURN_RATIO * (seconds["decode"] + seconds["post"])
    log.info(
        "%s: a %dx%d photo: decode %.3fs, forward pass %.3fs per image, post-processing %.3fs -> CPU work runs %s "
        "forward passes",
        name,
        *PHOTO_SIZE[::-1],
        seconds["decode"],
        forward_s,
        seconds["post"],
        "between" if take_turns else "beside",
    )
    policy = BatchPolicy(
        max_batch_size=batch_size,
        max_delay_s=s.max_batch_delay_ms / 1000,
        bucket_px=BUCKET_PX,
        size_divisor=runner.config.preprocess.size_divisor,
        fixed_size=runner.input.size,
    )
    lane = Lane(
        f"{name} v{number}",
        runner.run,
        policy,
        rates,
        take_turns=take_turns,
        fixed_batch=runner.input.batch,
        resident_bytes=weights_bytes(path),
    )
    return Version(name, number, path, runner, lane, batch_size, batch_seconds, time.perf_counter() - t_start)


def measure_request(runner: Runner, size: tuple[int, int]) -> tuple[Rates, dict[str, float]]:
    """One request of a ``size`` (h, w) photo-like JPEG through every step (decoded, resized the checkpoint's
    way): its seconds per step, and the rates per pixel they give (decode and post-processing per image pixel,
    the pass per padded pixel)."""
    h, w = size
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]  # (1, w, 1) a gradient with texture on it
    pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)  # (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    cfg = runner.config
    t0 = time.perf_counter()
    prepared = steps.prepare(steps.decode(data), cfg, runner.input.size)
    t1 = time.perf_counter()
    ph, pw = runner.input.size or prepared.pixels.shape[1:]
    batch = assemble([Item(prepared.pixels, prepared.resized_size)], (ph, pw), runner.input.batch)  # (B, 3, Hp, Wp)
    class_logits, mask_logits = runner.run(batch)
    t2 = time.perf_counter()
    body = steps.answer(steps.default_task(cfg), cfg, prepared, class_logits[0], mask_logits[0])
    json.dumps(body)
    t3 = time.perf_counter()
    seconds = {"decode": t1 - t0, "forward": t2 - t1, "post": t3 - t2}
    rates = Rates(
        decode_s_per_px=seconds["decode"] / (h * w),
        forward_s_per_px=seconds["forward"] / (ph * pw),
        post_s_per_px=seconds["post"] / (h * w),
    )
    return rates, seconds
