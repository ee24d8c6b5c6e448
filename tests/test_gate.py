"""Forward passes and the requests' CPU work taking turns (service.gate), alone and inside the service state.

Orders are asserted with events and timestamps the gate itself imposes, never durations."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runtimes.runner import available_cpus
from service.batching import Batcher, BatchPolicy, Item
from service.errors import HTTPError
from service.gate import TurnGate
from service.settings import Settings
from service.state import ServiceState, takes_turns


def in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_a_pass_waits_for_the_cpu_tasks_queued_before_it_and_later_tasks_wait_for_the_pass():
    gate = TurnGate()
    log: list[str] = []
    early = gate.ticket()  # queued before the pass became ready
    release_early = threading.Event()

    def early_task():
        with gate.cpu(early):
            log.append("early starts")
            release_early.wait(5)
            log.append("early ends")

    def forward():
        with gate.forward():
            log.append("pass")

    a = in_thread(early_task)
    while not log:
        time.sleep(0.001)
    b = in_thread(forward)
    while gate.busy() != (1, 1):  # the pass is waiting
        time.sleep(0.001)
    late = gate.ticket()  # queued while the pass waits: after it
    c = in_thread(lambda: gate.cpu(late).__enter__() or log.append("late") or gate.forget(late))
    time.sleep(0.05)
    assert log == ["early starts"]  # neither the pass nor the later task has run
    release_early.set()
    for t in (a, b, c):
        t.join(5)
    assert log == ["early starts", "early ends", "pass", "late"]
    assert gate.busy() == (0, 0)


def test_a_ticket_given_back_unused_does_not_hold_up_a_pass():
    """A CPU task cancelled while queued (its request timed out) never runs; its ticket must not block."""
    gate = TurnGate()
    ticket = gate.ticket()
    done = threading.Event()
    t = in_thread(lambda: gate.forward().__enter__() or done.set())
    assert not done.wait(0.05)
    gate.forget(ticket)
    assert done.wait(5)
    t.join(5)


def test_an_open_gate_lets_cpu_work_run_during_a_pass():
    gate = TurnGate(enabled=False)
    inside = threading.Event()
    with gate.forward():
        t = in_thread(lambda: gate.cpu(gate.ticket()).__enter__() or inside.set())
        assert inside.wait(5)  # ran while the pass is still going
    t.join(5)


def test_turns_by_default_on_the_cpu_with_all_cores_only():
    assert takes_turns(Settings())
    assert not takes_turns(Settings(device="cuda"))
    assert takes_turns(Settings(threads=1)) == (available_cpus() == 1)  # fewer threads than cores
    assert takes_turns(Settings(device="cuda", cpu_work_between_passes=True))
    assert not takes_turns(Settings(cpu_work_between_passes=False))


@pytest.mark.parametrize("between", [True, False])
def test_the_services_cpu_work_never_runs_during_a_forward_pass_when_taking_turns(between):
    """ServiceState's CPU pool and batcher, with a runner that records when it runs: a request step queued
    while a pass runs starts after it ends (taking turns); beside it, it runs during the pass (the pass here
    waits for it, which would never end if the gate held it back)."""
    state = ServiceState(Settings(cpu_work_between_passes=between))
    spans: dict[str, list[float]] = {}
    in_pass, step_ran = threading.Event(), threading.Event()

    def run(x):
        spans["pass"] = [time.monotonic()]
        in_pass.set()
        if not between:
            assert step_ran.wait(5)  # the step runs beside the pass
        else:
            time.sleep(0.05)
        spans["pass"].append(time.monotonic())
        return np.zeros((len(x), 2, 3), np.float32), np.zeros((len(x), 2, 4, 4), np.float32)

    def step():
        spans["step"] = [time.monotonic()]
        step_ran.set()
        spans["step"].append(time.monotonic())
        return "done"

    async def scenario():
        batcher = Batcher(BatchPolicy(max_batch_size=1, max_delay_s=0.0), run, state.infer_pool, gate=state.gate)
        batcher.start()
        try:
            item = Item(np.zeros((3, 16, 16), np.float32), (16, 16))
            result = batcher.submit(item)
            while not in_pass.is_set():
                await asyncio.sleep(0.001)
            out = await state.before(time.monotonic() + 10, "post-processing", [], step)
            await result
            state.gate.forget(item.ticket)  # its own post-processing's place in line, unused here
            return out
        finally:
            await batcher.stop()
            await state.close()

    assert asyncio.run(scenario()) == "done"
    if between:
        assert spans["step"][0] >= spans["pass"][1]
    else:
        assert spans["step"][0] < spans["pass"][1]
    assert state.gate.busy() == (0, 0)


def test_a_batchs_post_processing_runs_before_the_next_pass():
    """Two requests, batches of 1: the first one's post-processing must not wait for the second one's pass (it
    did where the event loop was slow to resume the request: the next pass, submitted as the first batch's
    results were set, got in line before the request asked for its turn; under load answers waited one more
    pass, 3.1 s at 1333x800 on one server start)."""
    state = ServiceState(Settings(cpu_work_between_passes=True))
    log: list[str] = []

    def run(x):
        log.append(f"pass {int(x[0, 0, 0, 0])}")
        time.sleep(0.05)
        return np.zeros((len(x), 2, 3), np.float32), np.zeros((len(x), 2, 4, 4), np.float32)

    async def scenario():
        batcher = Batcher(BatchPolicy(max_batch_size=1, max_delay_s=0.0), run, state.infer_pool, gate=state.gate)
        items = [Item(np.full((3, 16, 16), k, np.float32), (16, 16)) for k in (1, 2)]
        futures = [batcher.submit(it) for it in items]
        batcher.start()
        try:
            await futures[0]
            await asyncio.sleep(0.2)  # the event loop is busy with other requests before it resumes this one
            await state.before(
                time.monotonic() + 10, "post-processing", [], log.append, "post 1", ticket=items[0].ticket
            )
            await futures[1]
            await state.before(
                time.monotonic() + 10, "post-processing", [], log.append, "post 2", ticket=items[1].ticket
            )
        finally:
            await batcher.stop()
            await state.close()

    asyncio.run(scenario())
    assert log == ["pass 1", "post 1", "pass 2", "post 2"]
    assert state.gate.busy() == (0, 0)


def test_a_step_cut_off_at_its_deadline_does_not_hold_up_the_next_pass():
    """A 36-megapixel semantic map can take seconds past its request's 504: its thread cannot be stopped, but
    the next request's pass must not wait for it (it did: the next request got 504 too)."""
    state = ServiceState(Settings(cpu_work_between_passes=True))
    release = threading.Event()
    entered = threading.Event()

    def slow_step():
        release.wait(10)  # runs on long after its deadline

    def forward():
        with state.gate.forward():
            entered.set()

    passed_while_it_ran: list[bool] = []

    async def scenario():
        try:
            await state.before(time.monotonic() + 0.05, "post-processing", [], slow_step)
        finally:
            t = in_thread(forward)
            passed_while_it_ran.append(entered.wait(5))  # before the cut-off step ends
            release.set()
            t.join(5)
            await state.close()

    with pytest.raises(HTTPError) as refused:
        asyncio.run(scenario())
    assert refused.value.status == 504
    assert passed_while_it_ran == [True] and state.gate.busy() == (0, 0)


def test_opening_the_gate_lets_a_waiting_task_go_on():
    gate = TurnGate()
    ran = threading.Event()
    with gate.forward():
        ticket = gate.ticket()
        t = in_thread(lambda: gate.cpu(ticket).__enter__() or ran.set())
        assert not ran.wait(0.05)  # waits for the pass
        gate.enabled = False
        assert ran.wait(5)  # goes on, the pass still running
    t.join(5)


def test_by_default_the_service_takes_turns_only_while_the_pass_dominates_the_cpu_work():
    """The demo model's ratio (a 70 ms pass, 25 ms of CPU work) overlaps; swin-tiny's (1.1 s, 45 ms) takes
    turns; CPU time is what counts, and a fixed setting is never changed."""
    if not takes_turns(Settings()):
        pytest.skip("this process may not use all the cores")
    state = ServiceState(Settings())
    state.capacity.seed(1.1)
    state.on_answered([(0.05, 0.045)])
    assert state.gate.enabled
    state.capacity.seed(0.07)
    for _ in range(20):
        state.on_answered([(0.03, 0.025)])
    assert not state.gate.enabled
    state.capacity.seed(1.1)
    state.on_answered([(0.03, 0.025)])
    assert state.gate.enabled
    fixed = ServiceState(Settings(cpu_work_between_passes=True))
    fixed.capacity.seed(0.07)
    fixed.on_answered([(0.5, 0.5)])
    assert fixed.gate.enabled
    for s in (state, fixed):
        s.infer_pool.shutdown()
        s.cpu_pool.shutdown()
