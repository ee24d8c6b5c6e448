"""What the HTTP service's routes share (:class:`ServiceState`): settings, keys, the served models by name, the
scheduler, metrics and drain state; start-up, and loading, reloading and unloading models while serving.

Start-up loads every model given (:func:`service.models.load_version`, one after the other, in a loader thread)
and is ready once all are. A load while serving (the admin routes) makes a new version beside the old one: it
loads and warms up in the loader thread while the old one serves, then takes every request that arrives from
then on; the old version's lane is retired (it finishes what it admitted, then leaves and its runner is
dropped). A version that fails to load leaves the old one serving, and the error says why. One load at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtimes import Runner
from runtimes.runner import available_cpus
from service.access import Keys
from service.errors import HTTPError
from service.logs import ContextThreadPoolExecutor
from service.metrics import Metrics
from service.models import DEFAULT_MAX_BATCH, Version, load_version, weights_bytes
from service.scheduler import Scheduler
from service.settings import Runtime, Settings

log = logging.getLogger("m2f.service")

MAX_JOBS = 256  # requests admitted at once at most (each is also bounded by time and memory)


def cpu_workers() -> int:
    """Threads for decoding and post-processing: one per usable core, 1 to 4."""
    return max(1, min(available_cpus(), 4))


class ServiceState:
    """Everything the routes share: settings, keys, models, scheduler, metrics and drain state."""

    def __init__(self, settings: Settings, runner: Runner | None = None):
        self.settings = settings
        self.keys = Keys.from_file(settings.keys_file)
        self.sources = settings.model_sources()
        self.default = self.sources[0].name  # the model /v1/segment answers
        self.metrics = Metrics(settings.max_batch_size or DEFAULT_MAX_BATCH)
        self._given_runner = runner  # served as the default model instead of loading it (tests)
        self.models: dict[str, Version] = {}  # the version of each name that takes new requests
        self.draining_versions: list[Version] = []  # replaced or unloaded, finishing what they admitted
        self._numbers: dict[str, int] = {}  # the last version number of each name
        self._loading = asyncio.Lock()
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.uploads = 0  # bodies being read
        self.abandoned = asyncio.Event()  # set at the drain timeout: open requests are answered 503
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="m2f-infer")
        self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="m2f-load")
        # Request work (decode, post-processing): a pool that keeps the request id on the worker's log lines.
        self.cpu_pool = ContextThreadPoolExecutor(cpu_workers(), thread_name_prefix="m2f-cpu")
        self.scheduler = Scheduler(
            self.infer_pool,
            self.cpu_pool,
            cpu_workers(),
            settings.device.startswith("cpu"),
            max_jobs=MAX_JOBS,
            memory_bytes=settings.memory_mb * 2**20,
        )
        scheduler = self.scheduler
        self.metrics.queue_depth.set_function(lambda: scheduler.stats().waiting_for_pass)
        self.metrics.inflight.set_function(lambda: scheduler.stats().admitted)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, on_load_error: Callable[[], None]) -> None:
        """Start-up, run in the background once the app has started: load every model, then be ready. A failure
        is kept in ``load_error`` (reported on /readyz) and ``on_load_error`` is called (``serve`` makes it stop
        the server)."""
        try:
            for source in self.sources:
                runner = self._given_runner if source.name == self.default else None
                await self.load(source.name, source.path, runner, source.runtime)
            self.ready = True
            self.metrics.ready.set(1)
        except Exception as e:  # noqa: BLE001 - reported on /readyz and ends `m2f serve`
            self.load_error = e
            log.error("model failed to load: %s", e)  # one line; the traceback at debug level
            log.debug("model load traceback", exc_info=True)
            on_load_error()

    async def load(
        self, name: str, path: Path | None, runner: Runner | None = None, runtime: Runtime | None = None
    ) -> Version:
        """Load a new version of model ``name`` (in ``runtime`` if named) beside the current one, then swap: new
        requests go to it and the old one finishes what it admitted. Raises HTTPError 507 when it would not fit
        the memory budget, 422 when it fails to load (the old version keeps serving either way)."""
        async with self._loading:
            if self.draining:
                raise HTTPError(503, "draining", "the server is shutting down")
            available = self.scheduler.memory_bytes - self.scheduler.models_bytes()
            need = weights_bytes(path)
            if need > available:
                raise HTTPError(507, "over_memory", _memory_message(name, need, available))
            number = self._numbers.get(name, 0) + 1
            loop = asyncio.get_running_loop()
            try:
                version = await loop.run_in_executor(
                    self.load_pool, load_version, name, number, path, self.settings, runner, runtime
                )
            except Exception as e:
                raise HTTPError(422, "load_failed", f"model {name} (version {number}) failed to load: {e}") from e
            self._numbers[name] = number
            self._swap(name, version)
            log.info("%s: version %d serving: %s", name, number, json.dumps(version.runner.describe()))
            return version

    def _swap(self, name: str, version: Version) -> None:
        """``version`` takes the new requests of ``name`` (on the event loop: no request sees half a swap)."""
        runtime, metrics = version.runner.name, self.metrics

        def on_pass(n: int, seconds: float) -> None:
            metrics.batch_size.labels(name).observe(n)
            metrics.inference_duration.labels(name).observe(seconds)

        version.lane.on_pass = on_pass
        self.scheduler.add_lane(version.lane)
        old = self.models.get(name)
        self.models[name] = version
        metrics.model_info.labels(name, str(version.number), version.runner.config.name, runtime).set(1)
        if old is not None:
            self._retire(old)

    def _retire(self, version: Version) -> None:
        version.state = "draining"
        self.draining_versions.append(version)
        info = self.metrics.model_info

        def gone() -> None:
            self.draining_versions.remove(version)
            info.remove(version.name, str(version.number), version.runner.config.name, version.runner.name)
            log.info("%s: version %d drained and unloaded", version.name, version.number)

        self.scheduler.retire(version.lane, on_empty=gone)

    async def unload(self, name: str) -> Version:
        """Stop serving ``name``: new requests get 404, admitted ones are answered."""
        async with self._loading:
            version = self.version(name, ready_only=False)
            if name == self.default:
                raise HTTPError(409, "conflict", f"{name} is the default model (/v1/segment); it cannot be unloaded")
            del self.models[name]
            self._retire(version)
            return version

    def version(self, name: str, ready_only: bool = True) -> Version:
        """The version of ``name`` that takes new requests; 404 naming the models there are, or 503 while the
        server is loading."""
        version = self.models.get(name)
        if version is not None:
            return version
        if ready_only and not self.ready and any(s.name == name for s in self.sources):
            raise HTTPError(503, "not_ready", f"model {name} is still loading", {"Retry-After": "5"})
        there = ", ".join(sorted(self.models)) or "none yet"
        raise HTTPError(404, "not_found", f"no model named {name!r}; models: {there}")

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: %d request(s) in progress", self.busy())
        self.draining = True
        self.metrics.ready.set(0)

    def busy(self) -> int:
        """Requests the server holds now: bodies being read plus requests admitted and not yet answered."""
        return self.uploads + self.scheduler.stats().admitted

    def abandon_after(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """At ``seconds`` from now, answer every open request 503 ``draining`` (thread-safe)."""
        loop.call_soon_threadsafe(loop.call_later, seconds, self.abandoned.set)

    async def close(self) -> None:
        self.begin_drain()
        self.scheduler.close()
        for pool in (self.infer_pool, self.load_pool, self.cpu_pool):
            pool.shutdown(wait=True, cancel_futures=True)


def _memory_message(name: str, need: int, available: int) -> str:
    return (
        f"model {name} needs about {need / 2**20:.0f} MiB; the memory budget (memory_mb) leaves "
        f"{max(available, 0) / 2**20:.0f} MiB beside the models loaded"
    )
