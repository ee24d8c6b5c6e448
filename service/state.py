"""What the HTTP service's routes share (:class:`ServiceState`): settings, runner, scheduler, metrics and drain
state, and the start-up that loads the model, measures what a request costs, and starts the scheduler.

Start-up measures once, in the inference thread: the warm-up, the batch profile (when ``max_batch_size`` is not
given), and one request at the checkpoint's typical photo size (decode, forward pass, post-processing). These
seed the scheduler's seconds per pixel, and decide once whether CPU work and forward passes take turns on the
cores (:mod:`service.scheduler`): they do where inference runs on the CPU with every core and a pass is at
least ``TURN_RATIO`` times a request's CPU work.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from pipeline import steps
from pipeline.batch import BatchPolicy, Item, assemble, choose_batch_size, describe_profile, profile_batches
from runtimes import Runner, open_runner, typical_size
from runtimes.runner import available_cpus
from service.logs import ContextThreadPoolExecutor
from service.metrics import Metrics
from service.scheduler import Rates, Scheduler
from service.settings import Settings

log = logging.getLogger("m2f.service")

DEFAULT_MAX_BATCH = 4  # the largest batch the start-up profile tries when max_batch_size is not given
BUCKET_PX = 128  # padded sizes are batched together in steps of this many pixels per side
PHOTO_SIZE = (480, 640)  # (h, w) of the photo start-up measures a request with (most COCO images are 640x480)
MAX_JOBS = 256  # requests admitted at once at most (each is also bounded by time and memory)
# Take turns only where a forward pass per image is at least this many times a request's CPU work: a model
# whose pass dwarfs its CPU steps gains from having the cores alone, one whose steps are comparable loses
# (BENCHMARKS.md, the scheduler).
TURN_RATIO = 8.0


def cpu_workers() -> int:
    """Threads for decoding and post-processing: one per usable core, 1 to 4."""
    return max(1, min(available_cpus(), 4))


class ServiceState:
    """Everything the routes share: settings, runner, scheduler, metrics and drain state."""

    def __init__(self, settings: Settings, runner: Runner | None = None):
        self.settings = settings
        self.metrics = Metrics(settings.max_batch_size or DEFAULT_MAX_BATCH)
        self.runner: Runner | None = runner
        self.scheduler: Scheduler | None = None
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.uploads = 0  # bodies being read
        self.abandoned = asyncio.Event()  # set at the drain timeout: open requests are answered 503
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="m2f-infer")
        # Request work (decode, post-processing): a pool that keeps the request id on the worker's log lines.
        self.cpu_pool = ContextThreadPoolExecutor(cpu_workers(), thread_name_prefix="m2f-cpu")
        self.batch_size = settings.max_batch_size or 1
        self.batch_seconds: dict[int, list[float]] = {}  # the profile: seconds of each measured pass by batch size
        self.rates: Rates | None = None  # seconds per pixel measured at start-up
        self.take_turns = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self, on_load_error: Callable[[], None]) -> None:
        """Start-up, run in the background once the app has started: load and measure the model in the inference
        thread, then start the scheduler. A failure is kept in ``load_error`` (reported on /readyz) and
        ``on_load_error`` is called (``serve`` makes it stop the server)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.infer_pool, self.load)
            self.start_scheduler()
            log.info("ready: %s", json.dumps(self.runner.describe()))
        except Exception as e:  # noqa: BLE001 - reported on /readyz and ends `m2f serve`
            self.load_error = e
            log.error("model failed to load: %s", e)  # one line; the traceback at debug level
            log.debug("model load traceback", exc_info=True)
            on_load_error()

    def load(self) -> None:
        """Open the runner (unless given), warm it up, profile batch sizes, measure a request; blocking."""
        s = self.settings
        if self.runner is None:
            t0 = time.perf_counter()
            self.runner = open_runner(s.model, s.runtime, s.device, s.threads, s.cache_dir)
            log.info("loaded %s (%s) in %.1fs", self.runner.config.name, self.runner.name, time.perf_counter() - t0)
        runner = self.runner
        t0 = time.perf_counter()
        runner.warmup()
        log.info("warm-up took %.2fs", time.perf_counter() - t0)
        size = runner.input.size or typical_size(runner.config)
        self.batch_size = runner.input.batch or s.max_batch_size or 1
        if runner.input.batch is None and s.max_batch_size is None:
            t0 = time.perf_counter()
            self.batch_seconds = profile_batches(runner.run, size, DEFAULT_MAX_BATCH)
            # Latency limit: one pass may take at most a quarter of the request timeout.
            self.batch_size = choose_batch_size(self.batch_seconds, max_batch_s=s.request_timeout_s / 4)
            log.info(
                "batch profile at %dx%d, seconds per image by batch size (each round): %s -> batch size %d (%.1fs)",
                *size,
                describe_profile(self.batch_seconds),
                self.batch_size,
                time.perf_counter() - t0,
            )
        self.rates, seconds = measure_request(runner, PHOTO_SIZE)
        if self.batch_seconds:  # the profile's passes are steadier than one
            b = self.batch_size
            self.rates.forward_s_per_px = min(self.batch_seconds[b]) / b / (size[0] * size[1])
        forward_s = self.rates.forward_s_per_px * steps.padded_pixels(PHOTO_SIZE, runner.config, runner.input.size)
        all_cores = s.device.startswith("cpu") and (s.threads is None or s.threads >= available_cpus())
        self.take_turns = all_cores and forward_s >= TURN_RATIO * (seconds["decode"] + seconds["post"])
        log.info(
            "a %dx%d photo: decode %.3fs, forward pass %.3fs per image, post-processing %.3fs -> CPU work runs %s "
            "forward passes",
            *PHOTO_SIZE[::-1],
            seconds["decode"],
            forward_s,
            seconds["post"],
            "between" if self.take_turns else "beside",
        )

    def start_scheduler(self) -> None:
        runner, s = self.runner, self.settings
        policy = BatchPolicy(
            max_batch_size=self.batch_size,
            max_delay_s=s.max_batch_delay_ms / 1000,
            bucket_px=BUCKET_PX,
            size_divisor=runner.config.preprocess.size_divisor,
            fixed_size=runner.input.size,
        )
        self.scheduler = Scheduler(
            runner.run,
            policy,
            self.infer_pool,
            self.cpu_pool,
            cpu_workers(),
            self.take_turns,
            s.device.startswith("cpu"),
            self.rates,
            max_jobs=MAX_JOBS,
            memory_bytes=s.memory_mb * 2**20,
            fixed_batch=runner.input.batch,
            on_pass=self._on_pass,
        )
        scheduler = self.scheduler
        self.metrics.queue_depth.set_function(lambda: len(scheduler.policy))
        self.metrics.inflight.set_function(lambda: scheduler.stats().admitted)
        self.metrics.model_info.labels(runner.config.name, runner.name).set(1)
        self.ready = True
        self.metrics.ready.set(1)

    def _on_pass(self, n: int, seconds: float) -> None:
        self.metrics.batch_size.observe(n)
        self.metrics.inference_duration.observe(seconds)

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: %d request(s) in progress", self.busy())
        self.draining = True
        self.metrics.ready.set(0)

    def busy(self) -> int:
        """Requests the server holds now: bodies being read plus requests admitted and not yet answered."""
        return self.uploads + (0 if self.scheduler is None else self.scheduler.stats().admitted)

    def abandon_after(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """At ``seconds`` from now, answer every open request 503 ``draining`` (thread-safe)."""
        loop.call_soon_threadsafe(loop.call_later, seconds, self.abandoned.set)

    async def close(self) -> None:
        self.begin_drain()
        if self.scheduler is not None:
            self.scheduler.close()
        self.infer_pool.shutdown(wait=True, cancel_futures=True)
        self.cpu_pool.shutdown(wait=True, cancel_futures=True)


def measure_request(runner: Runner, size: tuple[int, int]) -> tuple[Rates, dict[str, float]]:
    """One request of a ``size`` (h, w) photo-like JPEG through every step (decoded, resized the checkpoint's way): its seconds per step, and the rates
    per pixel they give (decode and post-processing per image pixel, the pass per padded pixel)."""
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
