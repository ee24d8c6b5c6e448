"""The scheduler with a fake runner: batches, failures, cancellation, deadlines, admission, turns on the cores,
and a randomized liveness test (every request ends, whatever the step times, deadlines and cancellations)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.batch import BatchPolicy
from service.scheduler import BatchResult, Expired, Job, Lane, Rates, Refused, Scheduler

CHEAP = Rates(decode_s_per_px=1e-9, forward_s_per_px=1e-9, post_s_per_px=1e-9)


class Cores:
    """Fake work that records what runs at once: passes and CPU steps, and whether one ran beside the other."""

    def __init__(self, rng: random.Random | None = None, pass_s=(0.0, 0.0), cpu_s=(0.0, 0.0), fail=0.0):
        self.rng, self.pass_s, self.cpu_s, self.fail = rng or random.Random(0), pass_s, cpu_s, fail
        self.lock = threading.Lock()
        self.passes = self.cpu = 0
        self.overlapped = False  # a CPU step ran during a pass
        self.batches: list[int] = []
        self.lane: Lane | None = None  # the lane its jobs go to (set by ``scheduler``)

    def _draw(self, bounds: tuple[float, float]) -> float:
        with self.lock:
            return self.rng.uniform(*bounds)

    def run(self, x: np.ndarray):
        """A pass: class logits are each image's channel sums, mask logits its stride-4 first channel."""
        with self.lock:
            self.passes += 1
            self.overlapped |= self.cpu > 0
            self.batches.append(x.shape[0])
        try:
            time.sleep(self._draw(self.pass_s))
            return x.sum(axis=(2, 3))[:, None, :], x[:, :1, ::4, ::4]
        finally:
            with self.lock:
                self.passes -= 1

    def step(self, fn, *args):
        with self.lock:
            self.cpu += 1
            self.overlapped |= self.passes > 0
        try:
            time.sleep(self._draw(self.cpu_s))
            with self.lock:
                failing = self.rng.random() < self.fail
            if failing:
                raise ValueError("bad image")
            return fn(*args)
        finally:
            with self.lock:
                self.cpu -= 1


def image(h: int = 64, w: int = 64, value: float = 1.0):
    return SimpleNamespace(pixels=np.full((3, h, w), value, dtype=np.float32), resized_size=(h, w))


def make_job(cores: Cores, deadline: float, value: float = 1.0, finished: list | None = None, h=64, w=64) -> Job:
    def finish(prepared, result: BatchResult):
        if finished is not None:
            finished.append(value)
        return float(result.class_logits[0, 0]) / (h * w), result.batch_size

    return Job(
        cores.lane,
        lambda: cores.step(image, h, w, value),
        lambda p, r: cores.step(finish, p, r),
        deadline,
        original_px=h * w,
        padded_px=h * w,
    )


def scheduler(
    cores: Cores, turns: bool = False, max_batch: int = 4, delay_s: float = 0.0, rates: Rates = CHEAP, **kw
) -> Scheduler:
    """A scheduler with one lane that runs ``cores``' passes (``make_job(cores, ...)`` jobs go to it)."""
    policy = BatchPolicy(max_batch_size=max_batch, max_delay_s=delay_s, fixed_size=kw.pop("fixed_size", None))
    s = Scheduler(
        ThreadPoolExecutor(1),
        ThreadPoolExecutor(2),
        2,
        kw.pop("cores_shared", turns),
        max_jobs=kw.pop("max_jobs", 64),
        memory_bytes=kw.pop("memory_bytes", 2**30),
    )
    cores.lane = Lane("m", cores.run, policy, Rates(**vars(rates)), take_turns=turns, **kw)
    s.add_lane(cores.lane)
    return s


def later(seconds: float) -> float:
    return time.monotonic() + seconds


# ---------------------------------------------------------------------------------------------- behaviour
def test_concurrent_jobs_are_batched_and_each_gets_its_own_answer():
    async def go():
        cores = Cores(pass_s=(0.05, 0.05))
        s = scheduler(cores, delay_s=0.02)
        futures = [s.submit(make_job(cores, later(5), value=v)) for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
        answers = await asyncio.gather(*futures)
        assert [a for a, _ in answers] == [1.0, 2.0, 3.0, 4.0, 5.0]  # each image its own slice of the outputs
        assert max(b for _, b in answers) >= 2 and sum(cores.batches) == 5
        assert s.stats().admitted == 0

    asyncio.run(go())


def test_a_failing_step_fails_only_its_own_job_and_a_failing_pass_only_its_batch():
    async def go():
        cores = Cores()
        s = scheduler(cores, max_batch=1)
        bad = Job(cores.lane, lambda: (_ for _ in ()).throw(ValueError("not an image")), lambda p, r: 0, later(5), 1, 1)
        good = make_job(cores, later(5))
        f_bad, f_good = s.submit(bad), s.submit(good)
        with pytest.raises(ValueError, match="not an image"):
            await f_bad
        assert (await f_good)[0] == 1.0

        def broken(x):
            raise RuntimeError("model failure")

        cores.lane.run = broken
        with pytest.raises(RuntimeError, match="model failure"):
            await s.submit(make_job(cores, later(5)))
        cores.lane.run = cores.run
        assert (await s.submit(make_job(cores, later(5))))[0] == 1.0  # the scheduler goes on

    asyncio.run(go())


def test_a_fixed_batch_graph_gets_filler_images_and_refuses_what_does_not_fit():
    async def go():
        cores = Cores()
        s = scheduler(cores, max_batch=2, fixed_size=(64, 64), fixed_batch=2)
        assert (await s.submit(make_job(cores, later(5))))[0] == 1.0
        assert cores.batches == [2]  # one image and one zero image
        with pytest.raises(ValueError, match="does not fit"):
            await s.submit(make_job(cores, later(5), h=96, w=64))

    asyncio.run(go())


def test_a_cancelled_job_runs_no_later_step():
    async def go():
        cores = Cores(pass_s=(0.2, 0.2))
        s = scheduler(cores, max_batch=1)
        finished: list = []
        first = make_job(cores, later(5), finished=finished)
        second = make_job(cores, later(5), value=2.0, finished=finished)
        f1, f2 = s.submit(first), s.submit(second)
        await asyncio.sleep(0.05)  # the first is in its pass, the second waits for one
        s.cancel(first)
        s.cancel(second)
        assert f1.cancelled() and f2.cancelled()
        await asyncio.sleep(0.3)
        assert finished == [] and sum(cores.batches) == 1  # the running pass ended; nothing after it ran
        assert s.stats().admitted == 0

    asyncio.run(go())


def test_work_past_its_deadline_stops_at_the_next_step_boundary():
    async def go():
        cores = Cores(pass_s=(0.3, 0.3))
        s = scheduler(cores, turns=True, max_batch=1)  # both decoded before the first pass: the older goes first
        finished: list = []
        futures = [s.submit(make_job(cores, later(0.2), value=v, finished=finished)) for v in (1.0, 2.0)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        # the first's pass ends after its deadline: no post-processing; the second never gets its pass
        assert [type(r) for r in results] == [Expired, Expired]
        assert [r.step for r in results] == ["post-processing", "inference"]
        assert finished == [] and sum(cores.batches) == 1

    asyncio.run(go())


def test_close_fails_the_waiting_jobs_and_admits_nothing_more():
    async def go():
        cores = Cores(pass_s=(0.1, 0.1))
        s = scheduler(cores, max_batch=1)
        futures = [s.submit(make_job(cores, later(5))) for _ in range(3)]
        await asyncio.sleep(0.02)
        s.close()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, Refused) and r.reason == "draining" for r in results)
        with pytest.raises(Refused, match="shutting down"):
            s.submit(make_job(cores, later(5)))

    asyncio.run(go())


@pytest.mark.parametrize("turns", [True, False])
def test_cpu_steps_never_run_during_a_pass_when_taking_turns(turns):
    async def go():
        cores = Cores(random.Random(1), pass_s=(0.005, 0.02), cpu_s=(0.002, 0.01))
        s = scheduler(cores, turns=turns, max_batch=2)
        futures = [s.submit(make_job(cores, later(10))) for _ in range(30)]
        await asyncio.gather(*futures)
        assert cores.overlapped is not turns

    asyncio.run(go())


def test_the_oldest_jobs_step_goes_first():
    """A pass of older images goes before newer images' decoding (taking turns): answers come in admission order."""

    async def go():
        cores = Cores(pass_s=(0.01, 0.01), cpu_s=(0.005, 0.005))
        s = scheduler(cores, turns=True, max_batch=1)
        finished: list = []
        futures = [s.submit(make_job(cores, later(10), value=float(v), finished=finished)) for v in range(8)]
        await asyncio.gather(*futures)
        assert finished == sorted(finished)

    asyncio.run(go())


# ---------------------------------------------------------------------------------------------- admission
def test_admission_predicts_from_the_pixels_of_the_jobs_ahead():
    async def go():
        cores = Cores(pass_s=(0.5, 0.5))
        # 1 microsecond per pixel of each step, one step at a time: a 100x100 image costs 0.03 s, 1000x1000 3 s
        s = scheduler(cores, turns=True, rates=Rates(1e-6, 1e-6, 1e-6), max_batch=1)
        admitted = []
        with pytest.raises(Refused) as refused:
            while True:
                admitted.append(s.submit(make_job(cores, later(1.0), h=100, w=100)))
        # admitted while 2 x 0.03 s x n fits in 1 s: 16; the 17th would be answered past its deadline
        assert len(admitted) == 16
        assert refused.value.status == 503 and refused.value.reason == "queue_full"
        assert refused.value.retry_after_s == 1.0  # 0.48 s of work ahead; Retry-After is at least 1 s
        with pytest.raises(Refused, match="alone is predicted"):
            s.submit(make_job(cores, later(5.0), h=1000, w=1000))  # 2 x 3 s of work for a 5 s deadline: even idle
        s.close()
        await asyncio.gather(*admitted, return_exceptions=True)

    asyncio.run(go())


def test_admission_keeps_the_memory_estimate_within_the_budget():
    async def go():
        cores = Cores(pass_s=(0.2, 0.2))
        rates = Rates(1e-9, 1e-9, 1e-9, bytes_per_original_px=10.0, bytes_per_padded_px=0.0)
        s = scheduler(cores, rates=rates, max_batch=1, memory_bytes=250_000)  # 100x100: 100 kB
        f1, f2 = s.submit(make_job(cores, later(5), h=100, w=100)), s.submit(make_job(cores, later(5), h=100, w=100))
        with pytest.raises(Refused) as refused:
            s.submit(make_job(cores, later(5), h=100, w=100))
        assert refused.value.status == 503 and refused.value.reason == "over_memory"
        with pytest.raises(Refused) as refused:
            s.submit(make_job(cores, later(5), h=200, w=200))  # 400 kB alone: never
        assert refused.value.status == 413
        await asyncio.gather(f1, f2)
        await s.submit(make_job(cores, later(5), h=100, w=100))  # room again

    asyncio.run(go())


def test_measured_steps_update_the_seconds_per_pixel():
    async def go():
        cores = Cores(pass_s=(0.05, 0.05), cpu_s=(0.01, 0.01))
        s = scheduler(cores, max_batch=1)
        for _ in range(10):
            await s.submit(make_job(cores, later(5), h=100, w=100))
        assert s.lanes[0].rates.forward_s_per_px == pytest.approx(0.05 / 10_000, rel=0.5)  # a pass: its wall time
        # a CPU step: its thread's CPU time; these sleep, so it is about nothing (waiting is not work)
        assert s.lanes[0].rates.decode_s_per_px < 0.002 / 10_000 and s.lanes[0].rates.post_s_per_px < 0.002 / 10_000

    asyncio.run(go())


def test_a_slower_step_raises_the_estimate_at_once_and_faster_ones_lower_it_gradually():
    rates = Rates(1e-6, 1e-6, 1e-6)
    rates.observe("pass", 0.1, 10_000)  # 10x slower: the machine got busy
    assert rates.forward_s_per_px == pytest.approx(1e-5)
    rates.observe("pass", 0.01, 10_000)  # one fast pass
    assert rates.forward_s_per_px == pytest.approx(0.8 * 1e-5 + 0.2 * 1e-6)
    assert (rates.decode_s_per_px, rates.post_s_per_px) == (1e-6, 1e-6)


# ---------------------------------------------------------------------------------------------- liveness
def test_every_request_ends_under_random_bursts_deadlines_and_cancellations():
    """200 bursts of 10-100 requests against the real scheduler, with pass and CPU-step times drawn at random
    (seeded), random deadlines, cancellations at random moments and failing steps, in both modes, to one lane or
    two (a second model, slower, taking turns or not). Every request
    must end: answered, refused at admission, failed by its own step, dropped at its deadline, or cancelled.
    A request with a long deadline that is neither cancelled nor failed must be answered: the work of a burst
    takes well under a second, so a request left waiting for seconds means the scheduler stalled. After each
    burst nothing is left inside the scheduler."""
    rng = random.Random(20261207)
    outcomes: Counter = Counter()

    async def request(s: Scheduler, cores: Cores, long: bool, cancel_after: float | None) -> str:
        deadline = later(5.0 if long else rng.uniform(0.0, 0.05))
        job = make_job(cores, deadline)
        try:
            future = s.submit(job)
        except Refused:
            return "refused"
        try:
            await asyncio.wait_for(asyncio.shield(future), cancel_after)
            return "answered"
        except asyncio.TimeoutError:
            if cancel_after is not None and time.monotonic() < deadline:
                s.cancel(job)
                return "cancelled"
            s.cancel(job)
            return "stuck" if long else "timed out"
        except Expired:
            return "expired"
        except ValueError:
            return "failed"

    async def burst(i: int) -> None:
        cores = Cores(random.Random(i), pass_s=(0.0, 0.004), cpu_s=(0.0, 0.002), fail=0.03)
        s = scheduler(
            cores,
            turns=rng.random() < 0.5,
            max_batch=rng.choice([1, 2, 4]),
            delay_s=rng.choice([0.0, 0.002]),
            rates=Rates(1e-7, 1e-7, 1e-7),  # 64x64: about 1 ms per step predicted
            max_jobs=rng.choice([16, 64]),
        )
        lanes = [cores]
        if rng.random() < 0.5:  # a second model beside the first, its passes taking turns or not
            other = Cores(random.Random(-i), pass_s=(0.0, 0.008), cpu_s=(0.0, 0.002), fail=0.03)
            add_lane(s, other, "other", rates=Rates(1e-7, 2e-7, 1e-7), max_batch=rng.choice([1, 2]))
            other.lane.take_turns = rng.random() < 0.5
            lanes.append(other)
        n = rng.randint(10, 100)
        tasks = []
        for _ in range(n):
            long = rng.random() < 0.5
            cancel_after = rng.uniform(0.0, 0.05) if rng.random() < 0.2 else (5.5 if long else 0.06)
            tasks.append(asyncio.ensure_future(request(s, rng.choice(lanes), long, cancel_after)))
            if rng.random() < 0.3:
                await asyncio.sleep(rng.uniform(0, 0.003))
        results = await asyncio.gather(*tasks)
        outcomes.update(results)
        assert "stuck" not in results, (i, Counter(results))
        await asyncio.sleep(0.01)  # steps of cancelled jobs still running end
        assert s.stats().admitted == 0 and all(len(ln.policy) == 0 and ln.jobs == 0 for ln in s.lanes)
        assert s._cpu_running == 0 and s._pass_lane is None

    async def go():
        for i in range(200):
            await burst(i)

    asyncio.run(go())
    # every kind of ending happened, and most requests were answered
    assert outcomes["answered"] > sum(outcomes.values()) / 3, outcomes
    assert all(outcomes[k] > 0 for k in ("refused", "cancelled", "expired", "failed")), outcomes


# ---------------------------------------------------------------------------------------------- several lanes
class Logged(Cores):
    """Passes of a fixed length that append their lane's name to ``order`` as they start."""

    def __init__(self, name: str, pass_s: float, order: list[str]):
        super().__init__(pass_s=(pass_s, pass_s))
        self.name, self.order = name, order

    def run(self, x):
        self.order.append(self.name)
        return super().run(x)


def add_lane(s: Scheduler, cores: Cores, name: str, rates: Rates = CHEAP, max_batch: int = 1) -> Lane:
    """A second (third, ...) lane on ``s``, running ``cores``' passes."""
    cores.lane = Lane(name, cores.run, BatchPolicy(max_batch_size=max_batch, max_delay_s=0.0), Rates(**vars(rates)))
    s.add_lane(cores.lane)
    return cores.lane


def slow_and_fast(order: list[str], slow_s: float, fast_s: float) -> tuple[Scheduler, Logged, Logged]:
    """A scheduler with a slow lane and a fast one (one image per pass), both logging to ``order``."""
    slow, fast = Logged("slow", slow_s, order), Logged("fast", fast_s, order)
    s = scheduler(slow, max_batch=1)
    slow.lane.run = slow.run
    add_lane(s, fast, "fast")
    return s, slow, fast


def test_a_slow_lane_does_not_hold_a_fast_one_behind_its_backlog():
    """A lane whose passes take 10x longer, 20 jobs deep: a job of the fast lane gets its pass after at most the
    slow pass that runs and one that starts while it is decoded, not after the slow lane's backlog (FIFO would
    put it behind all 20)."""
    order: list[str] = []

    async def go():
        s, slow, fast = slow_and_fast(order, 0.05, 0.005)
        backlog = [s.submit(make_job(slow, later(30))) for _ in range(20)]
        for _ in range(3):
            await asyncio.sleep(0.12)  # a few slow passes in
            before = len(order)
            await s.submit(make_job(fast, later(30)))
            between = order[before:]
            assert between.count("fast") == 1 and between.index("fast") <= 2, between
        await asyncio.gather(*backlog)
        assert order.count("slow") == 20 and order.count("fast") == 3

    asyncio.run(go())


def test_a_lane_back_from_idle_has_banked_no_pass_time():
    """The fast lane serves alone for a while (0.8 s of passes), then goes idle; the slow lane, idle all along,
    gets a backlog of 20. A job of the fast lane must still get its pass after at most two slow ones: the slow
    lane starts from the pass time of the lane served last, not from its own (it would hold the fast lane for
    the 0.8 s it was idle, about 16 slow passes)."""
    order: list[str] = []

    async def go():
        s, slow, fast = slow_and_fast(order, 0.05, 0.02)
        for _ in range(40):
            await s.submit(make_job(fast, later(30)))
        backlog = [s.submit(make_job(slow, later(30))) for _ in range(20)]
        await asyncio.sleep(0.01)
        before = len(order)
        await s.submit(make_job(fast, later(30)))
        between = order[before:]
        assert between.count("fast") == 1 and between.index("fast") <= 2, between
        for f in backlog:
            f.cancel()
        for job in list(s._jobs):
            s.cancel(job)

    asyncio.run(go())


def test_admission_counts_another_lanes_passes_only_up_to_the_jobs_own_lane():
    async def go():
        slow, fast = Cores(pass_s=(0.02, 0.02)), Cores()
        s = scheduler(slow, rates=Rates(1e-9, 1e-4, 1e-9), max_batch=1)  # 64x64: 0.4 s predicted per pass
        add_lane(s, fast, "fast", rates=Rates(1e-9, 1e-6, 1e-9))  # 4 ms per pass
        backlog = [s.submit(make_job(slow, later(30))) for _ in range(10)]  # 4 s of slow passes predicted
        with pytest.raises(Refused, match="queued"):
            s.submit(make_job(slow, later(2.0)))  # behind its own lane's 4 s
        assert (await s.submit(make_job(fast, later(2.0))))[0] == 1.0  # the slow lane's passes count 4 ms
        for f in backlog:
            f.cancel()
        for job in list(s._jobs):
            s.cancel(job)

    asyncio.run(go())


def test_a_retired_lane_finishes_what_it_admitted_then_leaves():
    async def go():
        old, new = Cores(pass_s=(0.01, 0.01)), Cores()
        s = scheduler(old, max_batch=1)
        old_lane = old.lane
        in_flight = [s.submit(make_job(old, later(5))) for _ in range(3)]
        left = []
        add_lane(s, new, "new")
        s.retire(old_lane, on_empty=lambda: left.append(True))
        old.lane = old_lane
        with pytest.raises(Refused, match="unloaded"):
            s.submit(make_job(old, later(5)))
        assert (await s.submit(make_job(new, later(5))))[0] == 1.0
        assert [r[0] for r in await asyncio.gather(*in_flight)] == [1.0, 1.0, 1.0]
        assert left == [True] and s.lanes == [new.lane]

    asyncio.run(go())


def test_lane_memory_counts_in_the_budget():
    async def go():
        cores = Cores()
        s = scheduler(cores, memory_bytes=200_000, max_batch=1)  # 100x100 images: 24 + 16 bytes a pixel = 400 kB
        cores.lane.resident_bytes = 150_000
        with pytest.raises(Refused, match="MiB") as refused:
            s.submit(make_job(cores, later(5), h=60, w=60))  # 144 kB, over the 50 kB the model leaves
        assert refused.value.status == 413
        cores.lane.resident_bytes = 0
        assert (await s.submit(make_job(cores, later(5), h=60, w=60)))[0] == 1.0

    asyncio.run(go())
