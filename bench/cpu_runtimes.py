"""The CPU forward pass per runtime, side by side on one host: ``transformers`` eager, ours eager (float32, and bf16
under PyTorch's autocast), ONNX Runtime fp32 and int8, OpenVINO f32, bf16 and int8, on the same weights and the
same exported files.

    python bench/cpu_runtimes.py [--sizes 384 640] [--rounds 5] [--check] [--json bench/results/cpu_runtimes.json]

The model is bench/common.py's swin-tiny COCO-panoptic checkpoint (random weights shaped like a trained model's),
exported once per size (fixed size, batch 1) by ``m2f export onnx``: float32, and int8 as the exporter writes it
(mixed precision: ``model_export.int8.FLOAT_MODULES`` stay float32) plus, for comparison, every MatMul int8 (what
the exporter wrote before issue 32). Rounds interleave the contenders (each round in a rotated order) so machine
noise hits all alike; the report gives the median and the spread (min-max) per contender in ms, the ratio to
``transformers``, and the accuracy against ONNX Runtime fp32 on the same input: max |diff| / max |ref| of the
class and mask logits, and the share of mask logits with the same sign. With ``--check``, the exporter's own check
(``model_export.check``: every decoder layer's attention mask and mask logits against PyTorch float32, at the
float32 tolerance for the float32 contenders and the int8 one for int8 and bf16) judges each contender too. The
CPU class (runtimes.cpu_class) and the default runner it picks are printed with the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_checkpoint, checkpoint_folder, full_setting, int8_exports, machine_info  # noqa: E402
from mask2former import load_model  # noqa: E402
from mask2former.attention_mask import attention_mask_at_level  # noqa: E402
from model_export.check import INT8_TOLERANCE, TOLERANCE, ProbedOutputs, check_against_pytorch, run_probed  # noqa: E402
from model_format.int8 import cpu_int8_kernel  # noqa: E402
from runtimes import open_runner  # noqa: E402
from runtimes.cpu_class import default_runtime  # noqa: E402
from runtimes.ort_session import available_cpus  # noqa: E402


def bf16(model: torch.nn.Module, x: torch.Tensor, aux: bool = False):
    """PyTorch's own bf16 path: autocast runs the matmuls and convolutions in bf16 (oneDNN: AMX tiles where the
    CPU has AMX, AVX512_BF16 instructions where it has those), the rest in float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x, aux=aux)


# The exported-file contenders: name -> (file of bench.common.int8_exports, runtime of open_runner, the export
# check's tolerance: float32's for the float32 paths, the int8 one for int8 and bf16).
FILE_CONTENDERS = {
    "onnxruntime fp32": ("fp32", "onnxruntime", TOLERANCE["float32"]),
    "onnxruntime int8": ("int8", "onnxruntime", INT8_TOLERANCE),
    "onnxruntime int8 (every MatMul)": ("int8-all", "onnxruntime", INT8_TOLERANCE),
    "openvino f32": ("fp32", "openvino", TOLERANCE["float32"]),
    "openvino bf16": ("fp32", "openvino-bf16", INT8_TOLERANCE),
    "openvino int8": ("int8", "openvino", INT8_TOLERANCE),
}
TORCH_BF16 = "ours, torch bf16 autocast"


def probed(name: str, files: dict[str, Path], ours: torch.nn.Module, x: torch.Tensor) -> ProbedOutputs:
    """What the export check compares for contender ``name``: its outputs and each decoder layer's mask logits
    and attention mask (model_export.check.run_probed for the exported files, PyTorch's own for bf16 autocast)."""
    layers = ours.config.decoder_layers
    if name == TORCH_BF16:
        with torch.inference_mode():
            out = bf16(ours, x, aux=True)
        steps = [s.float() for s in out.attention_logits]  # per layer (B, Q, S_l)
        arrays = [out.class_logits.float(), out.mask_logits.float(), *steps, *map(attention_mask_at_level, steps)]
        return ProbedOutputs([a.numpy() for a in arrays], True, False)
    file, runtime, _ = FILE_CONTENDERS[name]
    openvino = {"openvino": "f32", "openvino-bf16": "bf16"}.get(runtime)
    return run_probed(files[file], layers, [x.numpy()], openvino=openvino)[0]


def accuracy(got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    (cls, mask), (ref_cls, ref_mask) = got, ref
    return {
        "class_rel": float(np.abs(cls - ref_cls).max() / np.abs(ref_cls).max()),
        "mask_rel": float(np.abs(mask - ref_mask).max() / np.abs(ref_mask).max()),
        "mask_sign": float((np.sign(mask) == np.sign(ref_mask)).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 640])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="contenders to leave out (names as printed)")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint and exports here (default: a temp dir)")
    parser.add_argument("--check", action="store_true", help="also the exporter's check on each contender")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from transformers import Mask2FormerForUniversalSegmentation  # lazy: transformers (a development dependency)

    threads = available_cpus()
    torch.set_num_threads(threads)
    cls, runtime, why = default_runtime()
    out = {
        "machine": machine_info(threads),
        "cpu_class": cls,
        "int8_kernel": cpu_int8_kernel(),
        "default_runtime": runtime,
        "rounds": args.rounds,
        "results": [],
    }
    print(f"{datetime.date.today()} {out['machine']['cpu']}, {threads} threads; CPU class {cls}: default {runtime}")
    setting = full_setting()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        folder = build_checkpoint(setting, checkpoint_folder(work, setting, 0), 0)
        ours = load_model(folder).eval()
        theirs = Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
        for size in args.sizes:
            files = int8_exports(folder, work, size)
            runners = {
                name: open_runner(files[file], runtime, threads=threads)
                for name, (file, runtime, _) in FILE_CONTENDERS.items()
            }
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            xn = x.numpy()
            runs = {
                "transformers": lambda x=x: theirs(pixel_values=x),
                "ours": lambda x=x: ours(x),
                TORCH_BF16: lambda x=x: bf16(ours, x),
            }
            runs.update({name: (lambda r=r, xn=xn: r.run(xn)) for name, r in runners.items()})
            runs = {k: v for k, v in runs.items() if k not in args.skip}
            ref = runners["onnxruntime fp32"].run(xn)
            acc = {name: accuracy(r.run(xn), ref) for name, r in runners.items() if name in runs}
            with torch.inference_mode():
                for name, o in (("ours", ours(x)), (TORCH_BF16, bf16(ours, x))):
                    acc[name] = accuracy((o.class_logits.float().numpy(), o.mask_logits.float().numpy()), ref)
                for fn in runs.values():  # warm-up
                    fn()
                times: dict[str, list[float]] = {k: [] for k in runs}
                names = list(runs)
                for i in range(args.rounds):
                    for name in names[i % len(names) :] + names[: i % len(names)]:
                        t0 = time.perf_counter()
                        runs[name]()
                        times[name].append((time.perf_counter() - t0) * 1e3)
            checks = {}
            if args.check:  # the exporter's check on every contender but the reference and transformers
                for name in (n for n in runs if n == TORCH_BF16 or n in FILE_CONTENDERS):
                    tolerance = INT8_TOLERANCE if name == TORCH_BF16 else FILE_CONTENDERS[name][2]
                    got = probed(name, files, ours, x)
                    (result,) = check_against_pytorch(None, ours, [xn], tolerance, onnx_outputs=[got])
                    checks[name] = {"check_passed": result.passed, "check": result.describe()}
            base = statistics.median(times["transformers"]) if "transformers" in times else None
            print(
                f"{size}x{size}, batch 1, {args.rounds} rounds (median ms, min-max, vs transformers; accuracy vs ORT fp32):"
            )
            for name, ms in times.items():
                med = statistics.median(ms)
                row = {"size": size, "runtime": name, "median_ms": med, "min_ms": min(ms), "max_ms": max(ms), "ms": ms}
                row["vs_transformers"] = base / med if base else None
                row.update(acc.get(name, {}))
                row.update(checks.get(name, {}))
                out["results"].append(row)
                a = acc.get(name)
                text = (
                    f"class {a['class_rel']:.1e}, mask {a['mask_rel']:.1e}, {a['mask_sign']:.3%} mask signs"
                    if a
                    else "—"
                )
                ratio = f"{row['vs_transformers']:.2f}x" if base else "—"
                print(f"  {name:32s} {med:7.0f} ({min(ms):.0f}-{max(ms):.0f}) {ratio:>6s}  {text}", flush=True)
                if name in checks:
                    print(f"      check: {checks[name]['check']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
