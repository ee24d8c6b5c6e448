"""Soak and overload on loopback: ``m2f serve`` at steady load for ``--minutes`` with its RSS sampled, then 10x over.

    python bench/soak.py                                   # 30 min steady + 60 s overload (demo model)
    python bench/soak.py --minutes 2 --overload-seconds 20 --out out/soak-short.json   # a short try
    python bench/soak.py --model model.onnx --serve-args "--memory-mb 1024 --threads 2"

Starts the real server (a subprocess on a free 127.0.0.1 port, its log in a file), then:
1. capacity: ``--capacity-clients`` closed-loop clients for ``--capacity-seconds``; answers 200 per second;
2. steady: an open loop (fixed intervals) at ``--load-fraction`` of capacity for ``--minutes``, on at most
   ``--connections`` keep-alive connections; a send due while all are busy is skipped and counted (the client
   fell behind). The server's RSS (VmRSS of it and its children, /proc) is sampled every ``--sample-seconds``;
   warm-up is the first 10 % of the phase or 2 minutes, whichever is shorter. Reported: RSS at the end of
   warm-up, at the end, max, growth after warm-up (MB, and MB/hour as the least-squares slope of the samples
   after warm-up), answers by status, p50/p99 latency of the 200s (send -> answer);
3. overload: ``--overload-factor`` x capacity for ``--overload-seconds`` on ``--overload-connections``. A 503 is
   refused before any work; a 504 was admitted and not answered in time: admitted = 200 + 504. Lost: no HTTP
   answer (connection error, ``--client-timeout``). The goal: no 504, nothing lost;
4. drain: ``--drain-requests`` sent at once, SIGTERM once one is admitted. Clean: every answer 200 or 503
   (``draining``, ``queue_full``), as many 200s as the server had admitted, exit status 0 or -SIGTERM (uvicorn
   re-raises it), no abandoned request or traceback in the log.
Requests are JPEGs of synthetic shapes (:mod:`m2f.synth`), a mix of ``--sizes`` x ``--tasks``. The
clients share the cores with the server: run it on an otherwise idle machine. Writes ``--out`` (default
``bench/results/soak.json``; JSON: machine, date, settings, RSS samples, results) and prints a markdown summary
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import itertools
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, percentiles  # noqa: E402
from m2f import synth  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WARMUP_FRACTION, WARMUP_MAX_S = 0.10, 120.0


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Request:
    task: str
    data: bytes  # JPEG


def request_mix(sizes: list[str], tasks: list[str], seed: int = 41) -> list[Request]:
    """One synthetic JPEG per (size, task), each a different sample."""
    out = []
    for k, (size, task) in enumerate(itertools.product(sizes, tasks)):
        w, h = (int(v) for v in size.lower().split("x"))
        buf = io.BytesIO()
        Image.fromarray(synth.make_sample(seed=seed, index=k, size=(h, w)).image).save(buf, "JPEG", quality=90)
        out.append(Request(task, buf.getvalue()))
    return out


# ---------------------------------------------------------------------------------------------- server
class Server:
    """``m2f serve`` as a subprocess on 127.0.0.1, its output in ``log_path``."""

    def __init__(self, extra: list[str], log_path: Path):
        self.port, self.log_path = free_port(), log_path
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "m2f.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd + extra, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f} s; log: {self.log_path}")

    def metric(self, name: str) -> float:
        """An unlabelled sample of ``/metrics`` (0 when absent)."""
        for line in httpx.get(self.base + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def tree_rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` and all its descendants, in MB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total_kb, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kb / 1024


class RssSampler(threading.Thread):
    """Samples the server's RSS every ``period`` seconds: ``(seconds since start, phase, MB)``."""

    def __init__(self, pid: int, period: float):
        super().__init__(daemon=True)
        self.pid, self.period, self.phase = pid, period, "start"
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, str, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((round(time.monotonic() - self.t0, 2), self.phase, round(tree_rss_mb(self.pid), 2)))
            self.done.wait(self.period)


# ---------------------------------------------------------------------------------------------- load
@dataclass
class Tally:
    """Answers of one phase: by ``"200"``, ``"503 queue_full"``, ``"lost ReadTimeout"``, ...; latencies of 200s."""

    codes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    skipped: int = 0  # open loop: sends due while every connection was busy
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, client: httpx.Client, req: Request) -> float:
        """Sends ``req`` and counts its answer; returns the seconds of a 503's Retry-After, else 0."""
        t0, retry_after = time.perf_counter(), 0.0
        try:
            r = client.post(
                "/v1/segment", content=req.data, headers={"Content-Type": "image/jpeg"}, params={"task": req.task}
            )
            key = str(r.status_code) if r.status_code == 200 else f"{r.status_code} {reason(r)}"
            if r.status_code == 503:
                retry_after = float(r.headers.get("Retry-After", 1))
        except httpx.HTTPError as e:  # no HTTP answer: connection error, client timeout, broken response
            key = f"lost {type(e).__name__}"
        dt = time.perf_counter() - t0
        with self.lock:
            self.codes[key] += 1
            if key == "200":
                self.latencies.append(dt)
        return retry_after

    def count(self, prefix: str) -> int:
        return sum(n for k, n in self.codes.items() if k.split()[0] == prefix)


def reason(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["reason"])
    except (ValueError, KeyError, TypeError):
        return "?"


def closed_loop(base: str, mix: list[Request], clients: int, seconds: float, timeout: float) -> tuple[Tally, float]:
    """``clients`` threads, each sending its next request once the last is answered (up to 1 s later after a
    503, as its Retry-After asks: refused clients must not spin on the cores the server needs). (tally, wall s)."""
    tally, stop_at = Tally(), time.monotonic() + seconds

    def run(k: int) -> None:
        with httpx.Client(base_url=base, timeout=timeout) as c:
            for i in itertools.count(k, clients):
                if time.monotonic() >= stop_at:
                    return
                time.sleep(min(tally.send(c, mix[i % len(mix)]), 1.0))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    return tally, time.perf_counter() - t0


def open_loop(base: str, mix: list[Request], rate: float, seconds: float, connections: int, timeout: float) -> Tally:
    """Sends due every ``1/rate`` s for ``seconds``, each on a free one of ``connections`` keep-alive
    connections (one per worker thread); waits for the answers of what was sent."""
    tally, local, clients = Tally(), threading.local(), []
    free = threading.Semaphore(connections)

    def send(req: Request) -> None:
        try:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base, timeout=timeout)
                clients.append(local.client)
            tally.send(local.client, req)
        finally:
            free.release()

    t0 = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        for n in itertools.count():
            due = t0 + n / rate
            if due >= t0 + seconds:
                break
            time.sleep(max(due - time.monotonic(), 0))
            if free.acquire(blocking=False):
                pool.submit(send, mix[n % len(mix)])
            else:
                tally.skipped += 1
    for c in clients:
        c.close()
    return tally


def drain_check(server: Server, mix: list[Request], n: int, timeout: float) -> dict[str, Any]:
    """``n`` requests at once, SIGTERM once one is admitted; their answers, the exit status, the log."""
    tally = Tally()

    def run(i: int) -> None:
        with httpx.Client(base_url=server.base, timeout=timeout) as c:
            tally.send(c, mix[i % len(mix)])

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(run, i) for i in range(n)]
        end = time.monotonic() + 10
        while server.metric("m2f_inflight_requests") < 1 and time.monotonic() < end:
            time.sleep(0.02)
        answered_before = sum(f.done() for f in futures)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
    code = server.stop()
    log = server.log()
    abandoned, tracebacks = log.count("drain timeout: abandoned"), log.count("Traceback")
    found = re.search(r"draining: (\d+) request\(s\) in progress", log)
    admitted = int(found.group(1)) if found else None  # the server's count at SIGTERM
    ok_codes = all(k.split()[0] in ("200", "503") for k in tally.codes)  # answered, or refused before any work
    answered = admitted is not None and tally.count("200") >= admitted  # everything admitted at SIGTERM
    clean = ok_codes and answered and code in (0, -signal.SIGTERM) and abandoned == tracebacks == 0
    return {
        "requests": n,
        "answered_before_sigterm": answered_before,
        "admitted_at_sigterm": admitted,
        "answers": dict(tally.codes),
        "exit_code": code,
        "exit_s": round(time.monotonic() - t0, 2),
        "abandoned": abandoned,
        "tracebacks": tracebacks,
        "clean": clean,
    }


# ---------------------------------------------------------------------------------------------- results
def rss_summary(samples: list[tuple[float, str, float]], start: float, warmup_end: float) -> dict[str, Any]:
    """RSS of the steady phase: at the end of warm-up, at the end, max, growth and slope after warm-up."""
    steady = [(t, mb) for t, phase, mb in samples if phase == "steady"]
    after = [(t, mb) for t, mb in steady if t >= warmup_end]
    at_warmup = next((mb for t, mb in reversed(steady) if t <= warmup_end), steady[0][1] if steady else None)
    out: dict[str, Any] = {"warmup_s": round(warmup_end - start, 1), "at_warmup_mb": at_warmup}
    out["end_mb"] = steady[-1][1] if steady else None
    out["max_mb"] = max((mb for _, mb in steady), default=None)
    out["growth_mb"] = round(out["end_mb"] - at_warmup, 2) if steady else None
    if len(after) >= 2:
        t, mb = np.asarray(after).T  # (N,), (N,)
        out["slope_mb_per_h"] = round(float(np.polyfit(t, mb, 1)[0]) * 3600, 2)
    else:
        out["slope_mb_per_h"] = None
    return out


def phase_row(tally: Tally, seconds: float, rate: float) -> dict[str, Any]:
    """Counts of one open-loop phase: sent, admitted (200 + 504), by status, lost; latency of the 200s."""
    ok, c503, c504 = tally.count("200"), tally.count("503"), tally.count("504")
    lost = tally.count("lost")
    sent = sum(tally.codes.values())
    row = {"offered": sent + tally.skipped, "skipped": tally.skipped, "sent": sent, "admitted": ok + c504}
    row.update({"200": ok, "503": c503, "504": c504, "other": sent - ok - c503 - c504 - lost, "lost": lost})
    row.update({"rate_per_s": round(rate, 2), "seconds": seconds, "codes": dict(tally.codes)})
    lat = percentiles(tally.latencies) if tally.latencies else {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    return row | {k: None if v is None else round(v, 1) for k, v in lat.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(report: dict[str, Any]) -> str:
    m, s, cap, rss = report["machine"], report["settings"], report["capacity"], report["rss"]
    st, ov, dr = report["steady"], report["overload"], report["drain"]
    lines = [
        f"{report['date']}, {m['cpu']}, {m['cores']} cores; model {s['model']}, runtime {report['runtime']}; "
        f"mix {' '.join(s['sizes'])} x {' '.join(s['tasks'])}",
        f"capacity ({cap['clients']} closed-loop clients, {cap['seconds']:g} s): {cap['images_per_s']:.2f} img/s",
        "",
        "| steady | minutes | rate/s | RSS after warm-up MB | end MB | max MB | growth MB | MB/hour | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {s['load_fraction']:.0%} of capacity | {s['minutes']:g} | {st['rate_per_s']} | {rss['at_warmup_mb']} | "
        f"{rss['end_mb']} | {rss['max_mb']} | {rss['growth_mb']} | {rss['slope_mb_per_h']} | {st['p50_ms']} | "
        f"{st['p99_ms']} |",
        "",
        "| phase | offered | skipped | sent | admitted | 200 | 503 | 504 | other | lost |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in (("steady", st), (f"overload {s['overload_factor']:g}x", ov)):
        cols = ("offered", "skipped", "sent", "admitted", "200", "503", "504", "other", "lost")
        lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")
    lines += [
        "",
        f"answers: steady {st['codes']}; overload {ov['codes']}",
        f"after overload: in flight {report['after_overload']['inflight']:g}, queue {report['after_overload']['queue']:g}",
        f"drain: {dr['requests']} requests, SIGTERM with {dr['requests'] - dr['answered_before_sigterm']} open "
        f"({dr['admitted_at_sigterm']} admitted); "
        f"answers {dr['answers']}; exit {dr['exit_code']} after {dr['exit_s']} s; "
        f"{'clean' if dr['clean'] else 'NOT clean'} (abandoned {dr['abandoned']}, tracebacks {dr['tracebacks']})",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder or .onnx (default: the demo model)")
    p.add_argument(
        "--serve-args", default="", help='more `m2f serve` flags: "--memory-mb 1024", --serve-args=--max-batch-size=1'
    )
    p.add_argument("--minutes", type=float, default=30.0, help="steady phase (default 30)")
    p.add_argument("--load-fraction", type=float, default=0.7, help="steady rate / capacity (default 0.7)")
    p.add_argument("--connections", type=int, default=32, help="steady phase keep-alive connections, at most (32)")
    p.add_argument("--capacity-seconds", type=float, default=20.0, help="capacity measurement (default 20)")
    p.add_argument("--capacity-clients", type=int, default=8, help="closed-loop clients measuring capacity (8)")
    p.add_argument("--overload-seconds", type=float, default=60.0, help="overload phase (default 60)")
    p.add_argument("--overload-factor", type=float, default=10.0, help="overload rate / capacity (default 10)")
    p.add_argument("--overload-connections", type=int, default=64, help="overload connections (64)")
    p.add_argument("--client-timeout", type=float, default=60.0, help="seconds; a request past it is lost (60)")
    p.add_argument("--sample-seconds", type=float, default=5.0, help="RSS sampling period (default 5)")
    p.add_argument("--drain-requests", type=int, default=8, help="requests open at SIGTERM, at most (8)")
    p.add_argument("--sizes", nargs="+", default=["320x240", "640x480", "1280x720", "1920x1080"], help="WxH")
    p.add_argument("--tasks", nargs="+", default=["panoptic", "instance", "semantic"])
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "soak.json",
        help="JSON result (default bench/results/soak.json)",
    )
    p.add_argument("--log", type=Path, help="server log file (default: a temporary file)")
    args = p.parse_args(argv)
    if min(args.minutes, args.load_fraction, args.capacity_seconds, args.overload_seconds, args.sample_seconds) <= 0:
        p.error("durations, --load-fraction and --sample-seconds must be positive")
    return args


def run_phases(args: argparse.Namespace, server: Server, mix: list[Request]) -> dict[str, Any]:
    """Capacity, steady load, overload and the drain on a ready server, its RSS sampled throughout."""
    sampler = RssSampler(server.proc.pid, args.sample_seconds)
    sampler.start()
    sampler.phase = "capacity"
    cap, wall = closed_loop(server.base, mix, args.capacity_clients, args.capacity_seconds, args.client_timeout)
    capacity = cap.count("200") / wall
    if capacity <= 0:
        raise RuntimeError(f"no request answered 200 while measuring capacity: {dict(cap.codes)}")
    print(f"capacity: {capacity:.2f} img/s ({dict(cap.codes)})", flush=True)

    sampler.phase, steady_s, rate = "steady", args.minutes * 60, args.load_fraction * capacity
    start = time.monotonic() - sampler.t0
    warmup_end = start + min(WARMUP_FRACTION * steady_s, WARMUP_MAX_S)
    steady = open_loop(server.base, mix, rate, steady_s, args.connections, args.client_timeout)
    print(f"steady: {dict(steady.codes)}, skipped {steady.skipped}", flush=True)

    sampler.phase, over_rate = "overload", args.overload_factor * capacity
    over = open_loop(server.base, mix, over_rate, args.overload_seconds, args.overload_connections, args.client_timeout)
    print(f"overload: {dict(over.codes)}, skipped {over.skipped}", flush=True)
    time.sleep(1)  # the last answers' bookkeeping
    after = {"inflight": server.metric("m2f_inflight_requests"), "queue": server.metric("m2f_queue_depth")}

    sampler.phase = "drain"
    drain = drain_check(server, mix, args.drain_requests, args.client_timeout)
    sampler.done.set()
    sampler.join()
    return {
        "capacity": {"clients": args.capacity_clients, "seconds": args.capacity_seconds, "images_per_s": capacity},
        "steady": phase_row(steady, steady_s, rate),
        "rss": rss_summary(sampler.samples, start, warmup_end),
        "overload": phase_row(over, args.overload_seconds, over_rate),
        "after_overload": after,
        "drain": drain,
        "rss_samples": [{"t_s": t, "phase": ph, "mb": mb} for t, ph, mb in sampler.samples],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra = ["--model", args.model] if args.model else []
    extra += shlex.split(args.serve_args)
    log_path = args.log or Path(tempfile.mkdtemp(prefix="m2f-soak-")) / "server.log"
    mix = request_mix(args.sizes, args.tasks)
    server = Server(extra, log_path)
    print(f"server log: {log_path}", flush=True)
    try:
        server.wait_ready()
        model = httpx.get(server.base + "/v1/model", timeout=10).json()
        results = run_phases(args, server, mix)
    finally:
        server.stop()
    settings = {k: v for k, v in vars(args).items() if not isinstance(v, Path)}
    settings["model"] = Path(args.model).name if args.model else "demo"  # no local paths
    report = {
        "benchmark": "soak",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "settings": settings,
        "runtime": model.get("runtime"),
        "batching": model.get("batching"),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + markdown(report) + f"\n\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
