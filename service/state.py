"""What the HTTP service's routes share (:class:`ServiceState`): settings, runner, batcher, metrics, admission
and drain state, and the start-up that loads the model and starts the batcher.

Admission: a request is let in only while at most ``max_queue`` are admitted and the measured cost of those
(forward pass per image + post-processing per request, :class:`~service.admission.Capacity`) leaves it time
to finish within its deadline; else 503 + Retry-After at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runtimes import Runner, open_runner, typical_size
from runtimes.runner import available_cpus
from service.admission import Admission, Capacity
from service.batching import (
    BatchCheck,
    Batcher,
    BatchPolicy,
    choose_batch_size,
    describe_profile,
    profile_batches,
)
from service.errors import HTTPError
from service.gate import TurnGate
from service.logs import ContextThreadPoolExecutor
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("m2f.service")

# Take turns (service.gate) only while a forward pass per image is at least this many times a request's CPU
# work (once on, until it falls under 0.8 times this). Measured on 2 cores (BENCHMARKS.md): swin-tiny (ratio
# 20-30 on 640x480 photos) got 0.90-0.92x from 8 clients against 1 overlapping and 0.97-1.03x taking turns;
# the demo model (ratio about 3, batch 2) 1.39x overlapping and 1.14-1.21x taking turns. Where between 3
# and 20 the break-even lies is not measured.
TURN_RATIO = 8.0


def takes_turns(settings: Settings) -> bool:
    """Whether the requests' CPU work waits for forward passes to end (``Settings.cpu_work_between_passes``;
    by default: inference on the CPU with as many intra-op threads as this process has cores)."""
    if settings.cpu_work_between_passes is not None:
        return settings.cpu_work_between_passes
    return settings.device.startswith("cpu") and (settings.threads is None or settings.threads >= available_cpus())


class ServiceState:
    """Everything the routes share: settings, runner, batcher, metrics, admission and drain state."""

    def __init__(self, settings: Settings, runner: Runner | None = None):
        self.settings = settings
        self.metrics = Metrics(settings.max_batch_size)
        self.runner: Runner | None = runner
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.admitted = 0
        self.uploads = 0  # bodies being read
        self.abandoned = asyncio.Event()  # set at the drain timeout: open requests are answered 503
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="m2f-infer")
        # Request work (decode, post-processing): a pool that keeps the request id on the worker's log lines.
        self.cpu_pool = ContextThreadPoolExecutor(settings.postprocess_workers, thread_name_prefix="m2f-cpu")
        self.gate = TurnGate(enabled=takes_turns(settings))  # CPU work and forward passes: in turn, or beside
        # By default the gate follows the measured ratio of a pass to a request's CPU work (on_answered).
        self.adaptive_turns = self.gate.enabled and settings.cpu_work_between_passes is None
        self.capacity = Capacity()  # measured cost per request, for admission
        self.batch_size = settings.max_batch_size  # the batcher's, from the profile (see `load`)
        self.batch_seconds: dict[int, list[float]] = {}  # the profile: seconds of each measured pass by batch size
        self.batch_check: BatchCheck | None = None  # checks a profiled batch size > 1 against served passes

    # ------------------------------------------------------------------ lifecycle
    async def start(self, on_load_error: Callable[[], None]) -> None:
        """Start-up, run in the background once the app has started: load and warm the model in the inference
        thread, then start the batcher. A failure is kept in ``load_error`` (reported on /readyz) and
        ``on_load_error`` is called (``serve`` makes it stop the server)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.infer_pool, self.load)
            self.start_batcher()
            log.info("ready: %s", json.dumps(self.runner.describe()))
        except Exception as e:  # noqa: BLE001 - reported on /readyz and ends `m2f serve`
            self.load_error = e
            log.error("model failed to load: %s", e)  # one line; the traceback at debug level
            log.debug("model load traceback", exc_info=True)
            on_load_error()

    def load(self) -> None:
        """Open the runner (unless given) and warm it up; blocking, run in a thread."""
        s = self.settings
        if self.runner is None:
            t0 = time.perf_counter()
            self.runner = open_runner(s.model, s.runtime, s.device, s.threads, s.cache_dir)
            log.info("loaded %s (%s) in %.1fs", self.runner.config.name, self.runner.name, time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.runner.warmup()
        warmup_s = time.perf_counter() - t0
        log.info("warm-up took %.2fs", warmup_s)
        self.capacity.seed(warmup_s)
        self.batch_size = self.runner.input.batch or s.max_batch_size
        if s.batch_profile and self.runner.input.batch is None and s.max_batch_size > 1:
            size = self.runner.input.size or typical_size(self.runner.config)
            t0 = time.perf_counter()
            self.batch_seconds = profile_batches(self.runner.run, size, s.max_batch_size)
            # Latency limit: one pass may take at most a quarter of the request timeout.
            self.batch_size = choose_batch_size(self.batch_seconds, max_batch_s=s.request_timeout_s / 4)
            self.capacity.seed(min(self.batch_seconds[1]))
            if self.batch_size > 1:
                self.batch_check = BatchCheck(self.batch_size)
            log.info(
                "batch profile at %dx%d, seconds per image by batch size (each round): %s -> batch size %d (%.1fs)",
                *size,
                describe_profile(self.batch_seconds),
                self.batch_size,
                time.perf_counter() - t0,
            )

    def start_batcher(self) -> None:
        runner, s = self.runner, self.settings
        fixed_batch = runner.input.batch
        policy = BatchPolicy(
            max_batch_size=self.batch_size,
            max_delay_s=s.max_batch_delay_ms / 1000,
            bucket_px=s.bucket_px,
            size_divisor=runner.config.preprocess.size_divisor,
            fixed_size=runner.input.size,
        )
        self.batcher = Batcher(
            policy,
            runner.run,
            self.infer_pool,
            fixed_batch,
            on_batch=self._on_batch,
            on_depth=self._on_depth,
            gate=self.gate,
            check=self.batch_check,
        )
        self.batcher.start()
        self.metrics.model_info.labels(runner.config.name, runner.name).set(1)
        self.ready = True
        self.metrics.ready.set(1)

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch_size.observe(n)
        self.metrics.inference_duration.observe(seconds)
        self.capacity.on_batch(n, seconds)

    def on_answered(self, spent: list[tuple[float, float]], admission: Admission | None = None) -> None:
        """A request was answered 200 after CPU-pool steps that took ``spent`` ((seconds, CPU seconds) each);
        ``admission`` is what :meth:`admit` returned for it. Updates the admission's measurements and the
        gate's choice."""
        ratio = self.capacity.on_answered(sum(wall for wall, _ in spent), sum(cpu for _, cpu in spent), admission)
        if ratio is not None:
            self.metrics.admission_error.observe(ratio)
        if self.adaptive_turns:
            # CPU time, not wall time: beside a forward pass the wall time grows with the contention the gate
            # is there to avoid. A margin before turning back, so that noise near the bar does not flip it.
            cpu_time_s = self.capacity.cpu_time_s
            bar = TURN_RATIO * (0.8 if self.gate.enabled else 1.0)
            turns = self.capacity.forward_s >= bar * cpu_time_s
            if turns != self.gate.enabled:
                log.info(
                    "decoding and post-processing now run %s forward passes (%.3fs per image; %.3fs of CPU per request)",
                    "between" if turns else "beside",
                    self.capacity.forward_s,
                    cpu_time_s,
                )
            self.gate.enabled = turns

    def _on_depth(self, n: int) -> None:
        self.metrics.queue_depth.set(n)

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: %d request(s) admitted", self.admitted)
        self.draining = True
        self.metrics.ready.set(0)

    def busy(self) -> int:
        """Requests the server holds now: bodies being read plus requests admitted and not yet answered."""
        return self.uploads + self.admitted

    def abandon_after(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """At ``seconds`` from now, answer every open request 503 ``draining`` (thread-safe)."""
        loop.call_soon_threadsafe(loop.call_later, seconds, self.abandoned.set)

    async def close(self) -> None:
        self.begin_drain()
        if self.batcher is not None:
            await self.batcher.stop()
        self.infer_pool.shutdown(wait=True, cancel_futures=True)
        self.cpu_pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ admission
    def retry_after(self) -> str:
        """Seconds until the requests admitted now are likely answered (1..60)."""
        return str(min(max(math.ceil(self.capacity.predicted_s(self.admitted)), 1), 60))

    def refusal(self, remaining_s: float) -> HTTPError | None:
        """The 503 a request with ``remaining_s`` to its deadline would get now (draining, model not ready,
        queue full, or more admitted than can be answered in time), or None."""
        if self.draining:
            return HTTPError(503, "draining", "the server is shutting down", {"Retry-After": "1"})
        if not self.ready:
            if self.load_error is not None:
                return HTTPError(503, "not_ready", f"the model failed to load: {self.load_error}")
            return HTTPError(503, "not_ready", "the model is still loading", {"Retry-After": "5"})
        if self.admitted >= self.settings.max_queue:
            return HTTPError(
                503,
                "queue_full",
                f"{self.admitted} requests are queued; try again later",
                {"Retry-After": self.retry_after()},
            )
        predicted = self.capacity.predicted_s(self.admitted)
        if self.admitted > 0 and predicted > self.settings.admit_share * remaining_s:
            return HTTPError(
                503,
                "queue_full",
                f"{self.admitted} requests are queued; another would be answered in about {predicted:.1f} s, "
                f"past its deadline",
                {"Retry-After": self.retry_after()},
            )
        return None

    def check_admission(self, deadline: float) -> None:
        """Refuse at once what :meth:`admit` would refuse now (before the upload)."""
        if (refused := self.refusal(deadline - time.monotonic())) is not None:
            raise refused

    def admit(self, deadline: float) -> Admission:
        """Take a compute slot for a request due at ``deadline`` (``time.monotonic()``), or raise its 503.
        Returns when it was admitted and the answer time predicted for it (for :meth:`on_answered`); no
        prediction before the first answer: one that rests on the warm-up alone, for requests that pay the
        one-off costs of a new server (first calls at new sizes), must not calibrate the later ones."""
        self.check_admission(deadline)
        self.capacity.on_admitted(self.admitted)
        self.admitted += 1
        self.metrics.inflight.set(self.admitted)
        predicted = self.capacity.predicted_s(self.admitted - 1) if self.capacity.answered else None
        return Admission(time.monotonic(), predicted)

    def release(self) -> None:
        self.admitted -= 1
        self.metrics.inflight.set(self.admitted)

    async def before(
        self,
        deadline: float,
        step: str,
        spent: list[tuple[float, float]],
        fn: Callable[..., Any],
        *args: Any,
        ticket: int | None = None,
    ) -> Any:
        """``fn(*args)`` in the CPU pool if the request's deadline (``time.monotonic()``) has not passed, and
        its result if it comes before the deadline; else 504. A step cut off at the deadline finishes in its
        worker thread (Python threads cannot be stopped), but no later step of that request starts.
        (Seconds ``fn`` ran, its thread's CPU seconds) -- not its wait for a worker -- are appended to ``spent``.
        ``ticket``: its place in line for the gate, if taken earlier (``Item.ticket``); else taken now. It is given
        back on every way out."""
        if ticket is None:
            ticket = self.gate.ticket()  # its place in line, taken now (see service.gate)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.gate.forget(ticket)
            raise HTTPError(504, "timeout", f"the request's deadline passed before {step}")

        def timed() -> Any:
            with self.gate.cpu(ticket):
                if time.monotonic() >= deadline:  # its turn came too late: the request has had its 504
                    raise TimeoutError(step)
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return fn(*args)
                finally:
                    spent.append((time.perf_counter() - t0, time.thread_time() - c0))

        future = self.cpu_pool.submit(timed)
        future.add_done_callback(lambda _: self.gate.forget(ticket))  # also when cancelled before it ran
        work = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(work, remaining)
        except asyncio.TimeoutError:
            raise HTTPError(504, "timeout", f"the request's deadline passed during {step}") from None
        finally:
            # Answered, 504 or cancelled: the turn is over. A step cut off at the deadline keeps running in its
            # thread, but beside the next pass; passes must not wait for work no one will use.
            self.gate.forget(ticket)
