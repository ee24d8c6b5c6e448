"""Shared test helpers: a real ``m2f serve`` process on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m m2f.cli serve`` on a free loopback port, its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "m2f.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.base, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the ``/metrics`` samples of ``name`` whose labels include ``labels`` (0 when none)."""
        want = {f'{k}="{v}"' for k, v in labels.items()}
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            key, value = line.rsplit(" ", 1)
            sample, _, label_text = key.partition("{")
            got = set(label_text.rstrip("}").split(",")) if label_text else set()
            if sample == name and want <= got:
                total += float(value)
        return total

    def wait_metric(self, name: str, at_least: float, timeout: float = 5.0, **labels: str) -> float:
        """Poll ``/metrics`` until the sample reaches ``at_least`` or ``timeout`` passes; its last value."""
        end = time.monotonic() + timeout
        while (value := self.metric(name, **labels)) < at_least and time.monotonic() < end:
            time.sleep(0.02)
        return value

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: ``start_server(*args, env=...)`` starts ``m2f serve`` and waits until ready; stopped at the end."""
    servers: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(list(args), log_path, env)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


# ---------------------------------------------------------------------------------------------- demo graphs
@pytest.fixture(scope="session")
def demo_onnx(tmp_path_factory) -> Path:
    """The demo checkpoint through the exporter once per test run (about 30 s on 2 cores): fixed 160x160,
    dynamic batch, checked against PyTorch by the exporter itself. Shared by the service, demo-model and
    evaluation-report tests, which each used to export it again."""
    pytest.importorskip("onnxruntime")
    from mask2former.weights import DEMO_WEIGHTS
    from model_export.onnx import export_onnx

    path = tmp_path_factory.mktemp("demo-onnx") / "demo-fp32.onnx"
    export_onnx(DEMO_WEIGHTS, path, height=160, width=160, dynamic_batch=True, log=None)
    return path


@pytest.fixture(scope="session")
def demo_onnx_int8(demo_onnx, tmp_path_factory) -> Path:
    """:func:`demo_onnx` through the exporter's int8 step (``int8.quantize_export``, which
    ``export_onnx(quantize="int8")`` runs on the graph it wrote: int8 MatMul weights per channel, metadata
    marked int8); the int8 export's own check is tested on the tiny model."""
    import shutil

    from model_export import int8

    path = tmp_path_factory.mktemp("demo-onnx-int8") / "demo-int8.onnx"
    shutil.copy(demo_onnx, path)
    int8.quantize_export(path)
    return path
