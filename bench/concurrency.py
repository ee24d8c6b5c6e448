"""Concurrency 8 against concurrency 1 on one ``m2f serve``: does batching and overlap ever lose throughput?

    python bench/concurrency.py --model out/service_vs_naive/<checkpoint or .onnx> --rounds 6 --json FILE
    python bench/concurrency.py                        # the bundled demo model

Starts one server (``m2f serve`` with its default batching) and keeps it: comparing levels across server starts
mixes in the start-to-start spread of a 2-core VM (c=1 moved 0.65-1.04 img/s between starts in one afternoon).
After ``--warmup-seconds`` of load at the highest level, each round measures every ``--levels`` for ``--seconds``,
in an order that alternates from round to round (1 8, 8 1, ...), so that a drift of the machine's speed falls on
both levels alike. Reported: img/s per level pooled, the ratio of each level to the first within each round
(paired), their median and range, and the mean batch the server ran.

The clients run in a child process at ``--nice`` (default 19; :func:`bench.common.closed_loop_elsewhere`): on
loopback they share the server's 2 cores, and at normal priority eight of them waking to read answers and send
uploads cost the server throughput that clients on another host would not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, closed_loop, closed_loop_elsewhere, machine_info, parse_size, photos  # noqa: E402


def totals(base: str) -> dict[str, float]:
    """The server's counters that a phase's deltas explain: seconds in forward passes, images through them,
    seconds post-processing, requests post-processed (summed over their labels)."""
    names = {
        "m2f_inference_duration_seconds_sum": "forward_s",
        "m2f_batch_size_sum": "images",
        "m2f_postprocess_duration_seconds_sum": "postprocess_s",
        "m2f_postprocess_duration_seconds_count": "postprocessed",
    }
    out = dict.fromkeys(names.values(), 0.0)
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def measure(
    base: str, data: list[bytes], level: int, seconds: float, nice: int | None, raw: bool = False
) -> dict[str, Any]:
    """One closed-loop phase: in this process (``nice`` None) or in a child at that niceness; ``raw``: the
    photos as the request body rather than a multipart field."""
    params = {"task": "panoptic"}
    if nice is None:
        return closed_loop(base, data, level, seconds, params, raw=raw)
    return closed_loop_elsewhere(base, data, level, seconds, params, nice=nice, raw=raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder or .onnx (default: the bundled demo model)")
    p.add_argument("--size", type=parse_size, default=(640, 480), help="photo size WxH (default 640x480)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8], help="concurrency levels (default 1 8)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per level and round")
    p.add_argument("--warmup-seconds", type=float, default=10.0)
    p.add_argument("--nice", type=int, default=19, help="niceness added to the clients' process (default 19)")
    p.add_argument("--in-process", action="store_true", help="clients as threads of this process instead")
    p.add_argument("--raw-body", action="store_true", help="send each photo as the body, not a multipart field")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    nice = None if args.in_process else args.nice
    data = photos(args.size)
    server = Server(args.model, batch=4, delay_ms=5.0)  # m2f serve's default batching
    phases: list[dict[str, Any]] = []
    try:
        batching = httpx.get(server.base + "/v1/model", timeout=30).json()["batching"]  # the start-up profile
        print(f"batch size {batching['max_batch_size']} from the profile {batching['profile_s']}", flush=True)
        measure(server.base, data, max(args.levels), args.warmup_seconds, nice, args.raw_body)
        for rnd in range(args.rounds):
            order = args.levels if rnd % 2 == 0 else args.levels[::-1]
            for level in order:
                s0, n0 = server.batch_sizes()
                t0 = totals(server.base)
                run = measure(server.base, data, level, args.seconds, nice, args.raw_body)
                t1 = totals(server.base)
                s1, n1 = server.batch_sizes()
                d = {k: t1[k] - t0[k] for k in t0}
                phase = {
                    "round": rnd,
                    "level": level,
                    "answers": len(run["latencies"]),
                    "wall_s": run["wall_s"],
                    "images_per_s": len(run["latencies"]) / run["wall_s"],
                    "errors": run["errors"],
                    "refused": run["refused"],
                    "mean_batch": (s1 - s0) / (n1 - n0) if n1 > n0 else None,
                    # where the time went: forward pass per image, its share of the wall time, post-processing
                    "forward_s_per_image": d["forward_s"] / d["images"] if d["images"] else None,
                    "forward_share": d["forward_s"] / run["wall_s"],
                    "postprocess_s": d["postprocess_s"] / d["postprocessed"] if d["postprocessed"] else None,
                }
                phases.append(phase)
                print(
                    f"round {rnd + 1} c={level}: {phase['images_per_s']:.3f} img/s ({phase['answers']} answers, "
                    f"{phase['errors']} errors, {phase['refused']} refused, mean batch {phase['mean_batch']:.2f}; forward "
                    f"{phase['forward_s_per_image']:.3f} s/img, {phase['forward_share']:.0%} of the time; "
                    f"post-processing {phase['postprocess_s']:.3f} s)",
                    flush=True,
                )
        # the serving check of a profiled batch size > 1 (the size in use at the end, the pairs' ratios)
        check = httpx.get(server.base + "/v1/model", timeout=30).json()["batching"].get("check")
        print(f"batch size check at the end: {check}", flush=True)
    finally:
        server.stop()
    first = args.levels[0]
    summary: dict[str, Any] = {}
    for level in args.levels:
        mine = [x for x in phases if x["level"] == level]
        ratios = []
        for rnd in range(args.rounds):
            a = next(x for x in phases if x["round"] == rnd and x["level"] == first)
            b = next(x for x in phases if x["round"] == rnd and x["level"] == level)
            ratios.append(b["images_per_s"] / a["images_per_s"])
        summary[str(level)] = {
            "images_per_s": sum(x["answers"] for x in mine) / sum(x["wall_s"] for x in mine),
            "ratio_by_round": [round(r, 3) for r in ratios],
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        s = summary[str(level)]
        print(
            f"c={level}: {s['images_per_s']:.3f} img/s pooled; against c={first} by round "
            f"{', '.join(f'{r:.2f}' for r in ratios)} (median {s['ratio_median']:.2f}x)"
        )
    if args.json:
        out = {
            "date": str(datetime.date.today()),
            "machine": machine_info(os.cpu_count() or 1),  # the server's intra-op threads (its default: the cores)
            "model": "/".join(Path(args.model).parts[-2:]) if args.model else "demo",  # no local paths
            "size": f"{args.size[0]}x{args.size[1]}",
            "clients": "in-process threads" if nice is None else f"child process, nice +{nice}",
            "seconds": args.seconds,
            "batching": batching,
            "check": check,
            "phases": phases,
            "summary": summary,
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
