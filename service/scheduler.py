"""The scheduler: the one owner of what runs next -- admission, the queue, batches, CPU steps and forward passes.

A request is a :class:`Job` of three steps: ``prepare`` (decode and resize, on a CPU worker), its image's share
of a forward pass (on the inference thread, batched with others), and ``finish`` (post-process and encode, on
a CPU worker). :meth:`Scheduler.submit` admits a job or refuses it (:class:`Refused`), and returns a future for
``finish``'s result. Nothing else starts work: every event (a job submitted or cancelled, a step ended, a batch's
waiting time over) calls :meth:`Scheduler._dispatch`, which starts whatever may start now. All of the scheduler
runs on the event loop's thread, so its state needs no locks, and the worker threads only run the step they are
given: they never wait for anything but their own work. Liveness follows from that structure: a step always
ends, each end calls the dispatcher, and the dispatcher starts work whenever a resource is free and a step is
ready (the rules below never leave both idle while something is ready).

What runs next: the step of the **oldest** job (admission order) that is ready; a pass counts as old as the
oldest image in it. Each served model version is a :class:`Lane` with its own runner, batch policy and measured
rates; its images wait for a pass in buckets of similar padded size (:class:`~pipeline.batch.BatchPolicy`), and a
bucket is ready when it is full or its oldest image has waited ``max_delay_s``. Passes of several lanes share the
one inference thread fairly: of the lanes with a ready batch, the one that has had the least pass time goes next
(a lane that comes back from idle starts from the pass time of the lane served last, so it cannot bank the time
it was idle), so a model that is ten times slower than another takes turns with it instead of holding it behind
its backlog.

- ``take_turns`` (a lane whose CPU forward pass uses every core): its pass runs alone. When the next pass is
  such a lane's and older than the oldest ready CPU step, no newer CPU step starts, and the pass starts as soon
  as the running ones end. CPU steps run together, up to ``cpu_workers`` at once. Beside a pass they would take
  cores from it, and it slows by more than they gain (BENCHMARKS.md).
- otherwise (a GPU, or fewer intra-op threads than cores): passes and CPU steps run side by side; each
  resource takes its oldest ready step.

Admission (:meth:`Scheduler.refusal`): a job is refused (503, with a Retry-After) unless it is predicted to end
before its deadline, and its memory fits the budget beside the models' and the jobs already in. The prediction
adds up the remaining steps of the jobs ahead of it, each from its image's size: decode and post-processing
scale with the original pixels, the pass with the padded input pixels. CPU steps are served oldest first, so
every admitted job's CPU work is ahead; passes are shared fairly, so another lane's pass work counts only up to
the job's own lane's (with the pass on an accelerator, the CPU steps are divided among the CPU workers). The
seconds per pixel are measured on every step served (seeded at start-up): a pass by its wall time (it uses
every core), a CPU step by its thread's CPU time (its wall time beside a pass or another step counts the waiting
for a core, which the sum would count twice); a slower step raises them at once, faster steps lower them
gradually. A job that alone is over the budget can never be served: 413. Work past a job's deadline stops at the
next step boundary: the job is dropped (:class:`Expired`) and no later step of it runs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.batch import BatchPolicy, Item, Size, assemble

log = logging.getLogger("m2f.service")

Outputs = tuple[np.ndarray, np.ndarray]  # class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)

ALPHA = 0.2  # weight of the newest step in the measured seconds per pixel, when it is faster than the estimate
# A job is admitted only if twice its predicted time fits before its deadline: what the prediction cannot see
# (other processes on the cores, the event loop reading a burst of uploads) slows passes at the start of a
# burst, before the estimate catches up (BENCHMARKS.md, the scheduler).
MARGIN = 2.0


class Refused(Exception):
    """Not admitted: ``status`` 503 (over capacity for now; retry after ``retry_after_s``) or 413 (never fits)."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after_s = status, reason, message, retry_after_s


class Expired(Exception):
    """The job's deadline passed before ``step`` could start: it was dropped there."""

    def __init__(self, step: str):
        super().__init__(f"the request's deadline passed before {step}")
        self.step = step


@dataclass(frozen=True)
class BatchResult:
    """An image's share of a forward pass."""

    class_logits: np.ndarray  # (Q, K+1)
    mask_logits: np.ndarray  # (Q, Hp/4, Wp/4), Hp x Wp the batch's padded size
    batch_size: int  # images in the batch (without filler images of a fixed-batch graph)
    queue_s: float  # ready for the pass -> the pass started
    inference_s: float  # the pass


@dataclass(frozen=True)
class Cost:
    """What a job is expected to take: seconds of each step, and bytes held while it is in."""

    decode_s: float
    forward_s: float
    post_s: float
    bytes: int


@dataclass(eq=False)
class Job:
    """One request's work. ``prepare() -> Prepared`` (``.pixels`` (3, h, w) float32 padded to the size divisor,
    ``.resized_size``) and ``finish(prepared, BatchResult) -> answer`` run on CPU workers; the answer is the
    result of the future :meth:`Scheduler.submit` returns."""

    lane: Lane  # the model version that serves it
    prepare: Callable[[], Any]
    finish: Callable[[Any, BatchResult], Any]
    deadline: float  # time.monotonic()
    original_px: int  # decoded pixels (from the image's header; drive decode and post-processing)
    padded_px: int  # pixels of the model input it will take
    cost: Cost | None = None  # set at admission
    seq: int = 0  # admission order
    step: str = "decode"  # the next step: decode, pass, post; "done" once it left the scheduler
    prepared: Any = None
    result: BatchResult | None = None
    ready_at: float = 0.0  # when it became ready for the pass
    future: asyncio.Future | None = None


# ---------------------------------------------------------------------------------------------- costs
@dataclass
class Rates:
    """Measured seconds per pixel of each step (moving averages), and the bytes a job holds per pixel."""

    decode_s_per_px: float  # per original pixel
    forward_s_per_px: float  # per padded input pixel, per image, at the batch sizes served
    post_s_per_px: float  # per original pixel
    bytes_per_original_px: float = 24.0  # decoded RGB, the label map, the strips of post-processing
    bytes_per_padded_px: float = 16.0  # the normalized input (12) and its share of the mask logits

    def cost(self, original_px: int, padded_px: int) -> Cost:
        return Cost(
            decode_s=self.decode_s_per_px * original_px,
            forward_s=self.forward_s_per_px * padded_px,
            post_s=self.post_s_per_px * original_px,
            bytes=int(self.bytes_per_original_px * original_px + self.bytes_per_padded_px * padded_px),
        )

    def observe(self, step: str, seconds: float, px: int) -> None:
        """A step took ``seconds`` for ``px`` pixels: a slower step is taken at once (the machine is busier),
        a faster one moves the estimate by ``ALPHA`` (one fast moment does not open the doors)."""
        name = {"decode": "decode_s_per_px", "pass": "forward_s_per_px", "post": "post_s_per_px"}[step]
        old, new = getattr(self, name), seconds / max(px, 1)
        setattr(self, name, new if new > old else (1 - ALPHA) * old + ALPHA * new)


@dataclass(eq=False)
class Lane:
    """One model version in the scheduler: its forward pass, batch policy and measured rates, and what it holds.

    ``run``: (B, 3, H, W) float32 -> (class_logits, mask_logits), called on the inference thread. ``take_turns``:
    its passes run alone on the cores (see the module docstring). ``fixed_batch``: the graph's fixed batch size,
    if any (batches are padded with zero images). ``resident_bytes``: the model's own memory, counted in the
    budget. ``on_pass``: called with (images, seconds) after each pass (metrics)."""

    name: str
    run: Callable[[np.ndarray], Outputs]
    policy: BatchPolicy
    rates: Rates
    take_turns: bool = False
    fixed_batch: int | None = None
    resident_bytes: int = 0
    on_pass: Callable[[int, float], None] = lambda n, s: None
    jobs: int = 0  # admitted, not done
    served_s: float = 0.0  # pass seconds it has had (fair sharing of the inference thread)
    retired: bool = False  # admits nothing more; leaves the scheduler once its jobs are done
    on_empty: Callable[[], None] | None = None  # called once when it has left (retired and empty)


# ---------------------------------------------------------------------------------------------- the scheduler
@dataclass
class Stats:
    """What the scheduler holds now (for metrics and /v1/models)."""

    admitted: int = 0  # jobs in, not yet done
    waiting_for_pass: int = 0
    bytes: int = 0  # the admitted jobs' memory estimate


class Scheduler:
    """Admits jobs and runs their steps (see the module docstring).

    Args:
        infer_pool: a one-thread executor for passes; ``cpu_pool``: ``cpu_workers`` threads for CPU steps.
        cores_shared: whether passes run on the CPU cores the CPU steps use (admission adds up their seconds).
        max_jobs: jobs admitted at once at most; ``memory_bytes``: the lanes' resident memory and the jobs'
            memory estimate at most.
        clock: ``time.monotonic`` (what deadlines are in).
    """

    def __init__(
        self,
        infer_pool: Executor,
        cpu_pool: Executor,
        cpu_workers: int,
        cores_shared: bool,
        max_jobs: int,
        memory_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.infer_pool, self.cpu_pool, self.cpu_workers = infer_pool, cpu_pool, max(cpu_workers, 1)
        self.cores_shared = cores_shared
        self.max_jobs, self.memory_bytes = max_jobs, memory_bytes
        self.clock = clock
        self.lanes: list[Lane] = []
        self._order = itertools.count()
        self._jobs: set[Job] = set()  # admitted, not done
        self._cpu_ready: list[tuple[int, Job]] = []  # heap by admission order: jobs whose next step is CPU work
        self._items: dict[Job, Item] = {}  # jobs waiting in their lane's policy
        self._cpu_running = 0
        self._pass_lane: Lane | None = None  # the lane whose pass runs now
        # The pass time of the lane whose pass started last (the least among the lanes then ready): a lane that
        # comes back from idle starts here, so it cannot bank the time it was idle and then hold the others.
        self._virtual_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # ------------------------------------------------------------------ lanes
    def add_lane(self, lane: Lane) -> None:
        """Serve ``lane`` from now on (its memory counts in the budget at once)."""
        self.lanes.append(lane)

    def retire(self, lane: Lane, on_empty: Callable[[], None] | None = None) -> None:
        """Admit nothing more to ``lane``; it leaves once its admitted jobs are done, then ``on_empty`` is called."""
        lane.retired, lane.on_empty = True, on_empty
        self._leave_if_done(lane)

    def _leave_if_done(self, lane: Lane) -> None:
        if lane.retired and lane.jobs == 0 and lane in self.lanes and lane is not self._pass_lane:
            self.lanes.remove(lane)
            if lane.on_empty is not None:
                lane.on_empty()

    def models_bytes(self) -> int:
        """The lanes' resident memory (a retired lane's counts until it has left)."""
        return sum(ln.resident_bytes for ln in self.lanes)

    def free_bytes(self) -> int:
        """The memory budget less the lanes' resident memory and the admitted jobs' estimate."""
        return self.memory_bytes - self.models_bytes() - sum(j.cost.bytes for j in self._jobs)

    # ------------------------------------------------------------------ admission
    def _ahead_s(self, jobs: Any, lane: Lane | None = None) -> float:
        """Seconds until ``jobs`` are all done, from their remaining steps; with ``lane``, until that lane's
        jobs among them are done, passes being shared fairly among the lanes (another lane's pass seconds count
        up to ``lane``'s own)."""
        cpu = 0.0
        forward: dict[Lane, float] = {}
        for job in jobs:
            c = job.cost
            if job.step == "decode":
                cpu += c.decode_s
            if job.step in ("decode", "pass"):
                forward[job.lane] = forward.get(job.lane, 0.0) + c.forward_s
            cpu += c.post_s
        if lane is None:
            passes = sum(forward.values())
        else:
            own = forward.get(lane, 0.0)
            passes = sum(min(f, own) for f in forward.values())
        if self.cores_shared:
            return passes + cpu  # every step on the same cores: their seconds add up, in turns or not
        return passes + cpu / self.cpu_workers  # passes on the accelerator, CPU steps side by side

    def retry_after_s(self) -> float:
        """Seconds until the jobs admitted now are likely done (1..60)."""
        return min(max(self._ahead_s(self._jobs), 1.0), 60.0)

    def refusal(self, job: Job | None = None) -> Refused | None:
        """Why ``job`` (its cost set) cannot be admitted now, or None. Without a job: whether any job would be
        refused now (the queue is full), before its image has been read."""
        if self._closed:
            return Refused(503, "draining", "the server is shutting down")
        if len(self._jobs) >= self.max_jobs:
            return Refused(503, "queue_full", f"{len(self._jobs)} requests are queued", self.retry_after_s())
        if job is None:
            return None
        if job.lane.retired or job.lane not in self.lanes:
            return Refused(503, "draining", f"model {job.lane.name} is being unloaded")
        cost = job.cost
        requests_budget = self.memory_bytes - self.models_bytes()
        if cost.bytes > requests_budget:
            return Refused(
                413,
                "too_large",
                f"the image needs about {cost.bytes / 2**20:.0f} MiB to serve, over the {requests_budget / 2**20:.0f} "
                f"MiB the server's memory budget leaves beside its models",
            )
        free = self.free_bytes()
        if cost.bytes > free:
            return Refused(
                503,
                "over_memory",
                f"requests in progress hold all but {max(free, 0) / 2**20:.0f} MiB of the memory the models leave; "
                f"this image needs {cost.bytes / 2**20:.0f} MiB",
                self.retry_after_s(),
            )
        predicted = self._ahead_s([*self._jobs, job], job.lane)
        left = job.deadline - self.clock()
        if MARGIN * predicted > left:
            alone = self._ahead_s([job])
            if MARGIN * alone > left:
                why = f"this image alone is predicted to take {alone:.1f} s, past its deadline ({left:.1f} s left)"
            else:
                why = f"{len(self._jobs)} requests are queued; this one would be answered in about {predicted:.1f} s"
            return Refused(503, "queue_full", why, self.retry_after_s())
        return None

    def submit(self, job: Job) -> asyncio.Future:
        """Admit ``job`` into its lane (raises :class:`Refused`) and return the future of its answer. The future
        fails with the step's exception, :class:`Expired`, or :class:`Refused` (503 draining) when the scheduler
        closes first."""
        lane = job.lane
        job.cost = lane.rates.cost(job.original_px, job.padded_px)
        if (refused := self.refusal(job)) is not None:
            raise refused
        if lane.jobs == 0:  # from idle: no credit for the time it was idle (see _start_pass)
            lane.served_s = max(lane.served_s, self._virtual_s)
        job.seq = next(self._order)
        job.future = asyncio.get_running_loop().create_future()
        self._jobs.add(job)
        lane.jobs += 1
        heapq.heappush(self._cpu_ready, (job.seq, job))
        self._dispatch()
        return job.future

    def cancel(self, job: Job) -> None:
        """Drop ``job`` (its client left, or its deadline passed): no later step of it starts. A step that runs
        now ends in its thread, and its result is dropped."""
        if job.step == "done":
            return
        if (item := self._items.pop(job, None)) is not None:
            job.lane.policy.remove(item)
        self._end(job, None)
        self._dispatch()

    def close(self) -> None:
        """Admit nothing more and end every job with a 503 ``draining`` :class:`Refused` (a step that runs now ends
        in its thread, and its result is dropped)."""
        self._closed = True
        for job in list(self._jobs):
            if (item := self._items.pop(job, None)) is not None:
                job.lane.policy.remove(item)
            self._end(job, Refused(503, "draining", "the server shut down before this request was answered"))
        if self._timer is not None:
            self._timer.cancel()

    def stats(self) -> Stats:
        """What the scheduler holds now (for the metrics)."""
        return Stats(
            admitted=len(self._jobs),
            waiting_for_pass=sum(len(ln.policy) for ln in self.lanes),
            bytes=sum(j.cost.bytes for j in self._jobs),
        )

    # ------------------------------------------------------------------ what runs next
    def _end(self, job: Job, outcome: Any, ok: bool = False) -> None:
        """The job leaves the scheduler: its future gets ``outcome`` (a result if ``ok``, else an exception)."""
        if job.step == "done":
            return
        job.step = "done"
        self._jobs.discard(job)
        job.lane.jobs -= 1
        fut = job.future
        if fut is not None and not fut.done():
            if ok:
                fut.set_result(outcome)
            elif outcome is None:
                fut.cancel()
            else:
                fut.set_exception(outcome)
        self._leave_if_done(job.lane)

    def _oldest_cpu(self, now: float) -> Job | None:
        """The oldest job whose next step is CPU work and may start (expired ones are dropped on the way)."""
        while self._cpu_ready:
            _, job = self._cpu_ready[0]
            if job.step == "done":
                heapq.heappop(self._cpu_ready)
            elif now >= job.deadline:
                heapq.heappop(self._cpu_ready)
                self._end(job, Expired("decoding" if job.step == "decode" else "post-processing"))
            else:
                return job
        return None

    def _next_pass(self, now: float) -> tuple[Lane, int] | None:
        """The lane whose batch goes next and that batch's oldest admission order, or None when no batch is ready
        (expired images are dropped first): of the lanes with a ready batch, the one that has had the least pass
        time; among equals, the one with the oldest image."""
        for job, item in list(self._items.items()):
            if now >= job.deadline:
                del self._items[job]
                job.lane.policy.remove(item)
                self._end(job, Expired("inference"))
        best: tuple[float, int, Lane] | None = None
        for lane in self.lanes:
            batch = lane.policy.peek(now)
            if batch is not None:
                key = (lane.served_s, min(it.seq for it in batch), lane)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[2], best[1])

    def _dispatch(self) -> None:
        """Start every step that may start now (see the module docstring). The only place work starts."""
        if self._closed:
            return
        now = self.clock()
        while True:
            if self._pass_lane is not None and self._pass_lane.take_turns:
                break  # a pass that runs alone: nothing starts beside it
            cpu = self._oldest_cpu(now)
            nxt = None if self._pass_lane is not None else self._next_pass(now)
            cpu_free = self._cpu_running < self.cpu_workers
            if nxt is not None and nxt[0].take_turns and (cpu is None or nxt[1] < cpu.seq):
                if self._cpu_running == 0:
                    self._start_pass(nxt[0], now)
                break  # the pass is next: no newer CPU step starts before it
            started = False
            if nxt is not None and not nxt[0].take_turns:
                self._start_pass(nxt[0], now)
                started = True
            if cpu is not None and cpu_free:
                self._start_cpu(cpu)
                started = True
            if not started:
                break
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        """Call the dispatcher again when a waiting bucket becomes ready by waiting."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadlines = [w for ln in self.lanes if (w := ln.policy.next_deadline()) is not None]
        when = min(deadlines, default=None)
        if when is not None and self._pass_lane is None and when > now:
            self._timer = asyncio.get_running_loop().call_later(when - now, self._dispatch)

    def _start_cpu(self, job: Job) -> None:
        heapq.heappop(self._cpu_ready)
        step = job.step
        self._cpu_running += 1
        if step == "decode":
            fn, args, px = job.prepare, (), job.original_px
        else:
            fn, args, px = job.finish, (job.prepared, job.result), job.original_px
        work = asyncio.get_running_loop().run_in_executor(self.cpu_pool, _timed, fn, *args)
        work.add_done_callback(lambda f: self._cpu_done(job, step, px, f))

    def _cpu_done(self, job: Job, step: str, px: int, work: asyncio.Future) -> None:
        self._cpu_running -= 1
        if work.cancelled():
            self._end(job, RuntimeError("the server is shutting down"))
        elif (error := work.exception()) is not None:
            self._end(job, error)
        else:
            value, _, cpu_s = work.result()
            job.lane.rates.observe(step, cpu_s, px)
            if job.step == "done":  # cancelled while it ran: the result is dropped
                pass
            elif step == "decode":
                job.prepared, job.step, job.ready_at = value, "pass", self.clock()
                item = Item(value.pixels, value.resized_size, seq=job.seq, job=job)
                try:
                    job.lane.policy.add(item, self.clock())
                    self._items[job] = item
                except ValueError as e:  # does not fit a fixed-shape graph
                    self._end(job, e)
            else:
                self._end(job, value, ok=True)
        self._dispatch()

    def _start_pass(self, lane: Lane, now: float) -> None:
        batch = lane.policy.next_batch(now)
        for it in batch:
            del self._items[it.job]
        size = lane.policy.padded_size(batch)
        self._pass_lane = lane
        self._virtual_s = max(self._virtual_s, lane.served_s)
        started = self.clock()
        work = asyncio.get_running_loop().run_in_executor(
            self.infer_pool, _timed, lambda: lane.run(assemble(batch, size, lane.fixed_batch))
        )
        work.add_done_callback(lambda f: self._pass_done(lane, batch, size, started, f))

    def _pass_done(self, lane: Lane, batch: list[Item], size: Size, started: float, work: asyncio.Future) -> None:
        self._pass_lane = None
        lane.served_s += self.clock() - started
        jobs = [it.job for it in batch]
        if work.cancelled() or work.exception() is not None:
            error = RuntimeError("the server is shutting down") if work.cancelled() else work.exception()
            if not work.cancelled():
                log.error("a batch of %d (%s) failed: %s", len(batch), lane.name, error, exc_info=error)
            for job in jobs:
                self._end(job, error)
        else:
            (class_logits, mask_logits), seconds, _ = work.result()
            lane.rates.observe("pass", seconds / len(batch), size[0] * size[1])
            lane.on_pass(len(batch), seconds)
            for i, job in enumerate(jobs):
                if job.step == "done":
                    continue
                job.result = BatchResult(class_logits[i], mask_logits[i], len(batch), started - job.ready_at, seconds)
                job.step = "post"
                heapq.heappush(self._cpu_ready, (job.seq, job))
        self._leave_if_done(lane)
        self._dispatch()


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """``fn(*args)``, the seconds it took and its thread's CPU seconds (in the worker thread)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    value = fn(*args)
    return value, time.perf_counter() - t0, time.thread_time() - c0
