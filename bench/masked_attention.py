"""GPU speed of the fused masked-attention kernel against the PyTorch paths it replaces.

Times the decoder's cross-attention at its real sizes (8 heads, d 32; 100 or 200 queries; the three levels
of an 800x1333 input: 25x42, 50x84 and 100x167 keys) for batch 1, 4 and 8 and float16, bfloat16, float32:

- ``fused``: :func:`mask2former.masked_attention.masked_attention`, mask derived from the logits on the fly;
- ``sdpa``: :func:`masked_attention_reference`, the model's path: boolean mask from the logits
  (sigmoid, compare, any, or) materialized as (B, 1, Q, S), then ``scaled_dot_product_attention``;
- ``sdpa-kernel``: the SDPA call alone on a mask built beforehand (what the mask build costs is the rest);
- ``unfused``: scores = q k^T materialized (B, H, Q, S), masked_fill, softmax, @ v.

Inputs have the decoder's layouts (q, k, v head views of (B, L, C) projections) and mask logits in the
inputs' dtype (as the model produces them) with about half the keys attended and a tenth of the rows
blocked everywhere; no logit is within 0.01 of zero, so the kernel's rule (logit >= 0) and the model's
(sigmoid >= 0.5) agree. Every path is checked against the float32 reference before it is timed
(max |diff| <= tol x max |ref|: float32 1e-5, float16 2e-3, bfloat16 1.6e-2, as in
tests/test_masked_attention.py); a failed check is reported and the script exits non-zero at the end.

Timing: CUDA events around each call after warm-up, median of ``--iters``. ``eager`` includes what the
host adds when the GPU waits for it (Triton's Python launch, our argument checks); ``graph`` replays the
call captured in a CUDA graph, the GPU time alone, which is what a CUDA-graph runtime pays. Ratios are
``other / fused`` (> 1: the kernel is faster).

    python bench/masked_attention.py                       # everything (a few minutes on an H100)
    python bench/masked_attention.py --quick               # batch 1, float16, 100 queries
    python bench/masked_attention.py --sweep --dtypes float16 --batch 1 8   # also try block configs
    python bench/masked_attention.py --json bench/results/masked_attention.json

Needs a CUDA device and Triton; exits with a message (status 2) without them.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask2former import masked_attention as ma  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# 800x1333 at strides 32, 16, 8 (ceil). Padded to a multiple of 32 (1344) the last is 100x168.
LEVELS = {"1/32": (25, 42), "1/16": (50, 84), "1/8": (100, 167)}
HEADS, HEAD_DIM = 8, 32
DEVICE = "cuda"


def make_inputs(b: int, nq: int, s: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q (B, H, Q, d), k, v (B, H, S, d) as head views of (B, L, C) tensors; mask logits (B, Q, S)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    c = HEADS * HEAD_DIM
    query = torch.randn(b, nq, c, device=DEVICE, generator=gen, dtype=dtype)
    key = torch.randn(b, s, c, device=DEVICE, generator=gen, dtype=dtype)
    value = torch.randn(b, s, c, device=DEVICE, generator=gen, dtype=dtype)
    q = query.view(b, nq, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, Q, d)
    k = key.view(b, s, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, S, d)
    v = value.view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
    logits = torch.randn(b, nq, s, device=DEVICE, generator=gen)  # (B, Q, S), about half attended
    logits = torch.where(logits.abs() < 0.01, torch.full_like(logits, 0.01).copysign(logits), logits)
    blocked = torch.rand(b, nq, 1, device=DEVICE, generator=gen) < 0.1  # a tenth of the rows blocked everywhere
    logits = torch.where(blocked, -logits.abs(), logits)
    return q, k, v, logits.to(dtype)


def unfused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Scores, mask, softmax and product as separate ops on materialized (B, H, Q, S) tensors."""
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, Q, S)
    half = torch.full((), 0.5, dtype=mask_logits.dtype, device=mask_logits.device)
    attend = mask_logits.sigmoid() >= half  # (B, Q, S)
    attend = attend | ~attend.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~attend.unsqueeze(1), float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, H, Q, d)


def bool_mask(mask_logits: torch.Tensor) -> torch.Tensor:
    half = torch.full((), 0.5, dtype=mask_logits.dtype, device=mask_logits.device)
    attend = mask_logits.sigmoid() >= half  # (B, Q, S)
    return (attend | ~attend.any(dim=-1, keepdim=True)).unsqueeze(1)  # (B, 1, Q, S)


def time_eager(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median ms of one call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def time_graph(fn: Callable[[], Any], warmup: int, iters: int, reps: int = 10) -> float | None:
    """Median ms of one call replayed from a CUDA graph of ``reps`` calls; None if capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile and allocate outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    except Exception as e:  # a path that cannot be captured is reported, not fatal
        print(f"      (CUDA graph capture failed: {type(e).__name__}: {e})", file=sys.stderr)
        return None
    ms = time_eager(graph.replay, warmup, iters)
    del graph
    return ms / reps


def check(name: str, out: torch.Tensor, ideal: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    rel = ((out.float() - ideal).abs().max() / ideal.abs().max()).item()
    ok = math.isfinite(rel) and rel <= TOL[dtype]
    if not ok:
        print(f"      CHECK FAILED {name}: max |diff| = {rel:.2e} x max |ref| > {TOL[dtype]}", file=sys.stderr)
    return rel, ok


def sweep_configs() -> list[ma.KernelConfig]:
    configs = []
    for bq, bs, warps, stages, splits in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3), (0, 1)):
        if bq * bs > 64 * 128:  # register pressure: larger tiles spill at d 32
            continue
        configs.append(ma.KernelConfig(bq, bs, splits, warps, stages))
    return configs


def run_case(b: int, nq: int, level: str, dtype: torch.dtype, args) -> dict[str, Any]:
    h, w = LEVELS[level]
    s = h * w
    q, k, v, logits = make_inputs(b, nq, s, dtype)
    mask = bool_mask(logits)
    ideal = ma.masked_attention_reference(q.float(), k.float(), v.float(), logits)
    paths = {
        "fused": lambda: ma.masked_attention(q, k, v, logits),
        "sdpa": lambda: ma.masked_attention_reference(q, k, v, logits),
        "sdpa-kernel": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "unfused": lambda: unfused(q, k, v, logits),
    }
    row: dict[str, Any] = {"batch": b, "queries": nq, "level": level, "keys": s, "dtype": str(dtype).split(".")[-1]}
    ok_all = True
    for name, fn in paths.items():
        with torch.inference_mode():
            rel, ok = check(name, fn(), ideal, dtype)
            ok_all &= ok
            row[name] = {
                "max_rel_diff": rel,
                "eager_ms": time_eager(fn, args.warmup, args.iters),
                "graph_ms": time_graph(fn, args.warmup, args.iters),
            }
    row["ok"] = ok_all
    if args.sweep:
        best = None
        for cfg in sweep_configs():
            with torch.inference_mode():
                try:
                    out = ma.masked_attention(q, k, v, logits, config=cfg)
                except Exception as e:  # e.g. out of shared memory for a large tile
                    print(f"      {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                _, ok = check(str(cfg), out, ideal, dtype)
                ms = time_graph(lambda cfg=cfg: ma.masked_attention(q, k, v, logits, config=cfg), 3, args.iters)
            if ok and ms is not None and (best is None or ms < best[1]):
                best = (cfg, ms)
        if best is not None:
            row["sweep_best"] = {"config": vars(best[0]), "graph_ms": best[1]}
    return row


def print_row(row: dict[str, Any]) -> None:
    head = f"B{row['batch']} Q{row['queries']} {row['level']:>4} S{row['keys']:<6} {row['dtype']:<8}"
    fused = row["fused"]
    parts = []
    for mode in ("eager_ms", "graph_ms"):
        base = fused[mode]
        cells = [f"fused {base:.3f}" if base is not None else "fused n/a"]
        for name in ("sdpa", "sdpa-kernel", "unfused"):
            t = row[name][mode]
            cells.append(f"{name} {t:.3f} ({t / base:.2f}x)" if t is not None and base else f"{name} n/a")
        parts.append(f"{mode[:-3]:>5} ms: " + ", ".join(cells))
    print(f"{head} {'ok' if row['ok'] else 'CHECK FAILED'}\n    " + "\n    ".join(parts))
    if "sweep_best" in row:
        print(f"    sweep best: {row['sweep_best']['config']} {row['sweep_best']['graph_ms']:.3f} ms (graph)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--queries", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="batch 1, float16, 100 queries")
    parser.add_argument("--sweep", action="store_true", help="also time block-size configs, report the best")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.dtypes, args.queries = [1], ["float16"], [100]

    if not torch.cuda.is_available():
        print("bench/masked_attention.py needs a CUDA device (torch.cuda.is_available() is False); nothing timed.")
        return 2
    if not ma.triton_available():
        print("bench/masked_attention.py needs Triton (pip install triton); nothing timed.")
        return 2
    if ma.interpreting():
        print("TRITON_INTERPRET is set: this would time Triton's interpreter. Unset it; nothing timed.")
        return 2

    import triton  # lazy: triton (Linux with a GPU only), its version once a GPU is found

    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    rows = []
    for dtype_name, b, nq, level in itertools.product(args.dtypes, args.batch, args.queries, args.levels):
        row = run_case(b, nq, level, DTYPES[dtype_name], args)
        print_row(row)
        rows.append(row)
        torch.cuda.empty_cache()
    failed = [r for r in rows if not r["ok"]]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"benchmark": "masked_attention", "machine": info, "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(report | {"results": rows}, indent=1) + "\n")
    if failed:
        print(f"{len(failed)} case(s) failed the accuracy check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
