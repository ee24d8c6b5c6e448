"""The exporter's check on another CPU class: ONNX Runtime under a CPU emulator, PyTorch natively.

    python bench/int8_emulated.py [--sizes 384 640] [--demo] [--emulator "qemu-x86_64 -cpu max"] [--json ...]

ONNX Runtime picks its integer kernels by the CPU's instructions (VNNI, AVX2 without VNNI, AMX), so an int8
file that passes its check on one CPU class is not shown to pass on another. A user-mode emulator such as QEMU
(``qemu-x86_64 -cpu max``: AVX2, no AVX-512, no VNNI) runs ONNX Runtime's AVX2 kernels on any x86 host. But
PyTorch's outputs under QEMU are wrong (see BENCHMARKS.md, issue 32), so a check run wholly under the emulator
fails even for float32 and shows nothing. Here only ONNX Runtime runs emulated: a child process of this script
(``--probe``) runs the check's ONNX Runtime half (``model_export.check.run_probed``) under the emulator and
saves what it computed; this process computes PyTorch's reference natively and compares with the exporter's
own check (``check_against_pytorch(..., onnx_outputs=...)``, unchanged tolerances). PyTorch can be held to the
emulated class's instructions natively too:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/int8_emulated.py

Models: bench/common.py's swin-tiny COCO-panoptic checkpoint (random weights shaped like a trained model's) at
each ``--sizes`` (fixed size, batch 1), and with ``--demo`` the demo checkpoint at 160 px; each as float32, int8
as the exporter writes it (mixed precision), and int8 with every MatMul quantized (before issue 32). One
standard-normal image (seed 0) per model. Reported per file, natively and emulated: the int8 kernel ONNX
Runtime uses there (``cpu_int8_kernel``), the check's verdict and its text, the share of output mask logits
with PyTorch's sign, and how far the emulated outputs are from the native ones. Emulated timings mean nothing
and are not reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
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
from mask2former.weights import DEMO_WEIGHTS  # noqa: E402
from model_export.check import INT8_TOLERANCE, TOLERANCE, ProbedOutputs, check_against_pytorch, run_probed  # noqa: E402
from model_format.int8 import cpu_int8_kernel  # noqa: E402
from runtimes.ort_session import available_cpus  # noqa: E402

# What caps PyTorch's own kernels at an instruction set, for a reference computed as a CPU of that class would
# (set them in the environment of this script, e.g. to AVX2; they must be set before PyTorch starts).
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def probe(model: Path, x_path: Path, out: Path, layers: int) -> None:
    """The child (run under the emulator): ONNX Runtime's half of the check, saved for the parent."""
    (got,) = run_probed(model, layers, [np.load(x_path)])
    arrays = {f"a{i}": a for i, a in enumerate(got.arrays)}
    np.savez(out, probed=got.probed, plugin_graph=got.plugin_graph, **arrays)
    print(json.dumps({"int8_kernel": cpu_int8_kernel()}))


def emulated(emulator: list[str], model: Path, x_path: Path, layers: int, work: Path) -> tuple[ProbedOutputs, str]:
    out = work / f"{model.stem}.probed.npz"
    cmd = [*emulator, sys.executable, str(Path(__file__).resolve()), "--probe", str(model), str(x_path), str(out)]
    done = subprocess.run([*cmd, "--layers", str(layers)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    kernel = json.loads(done.stdout.strip().splitlines()[-1])["int8_kernel"]
    with np.load(out) as z:
        arrays = [z[f"a{i}"] for i in range(len(z.files) - 2)]
        return ProbedOutputs(arrays, bool(z["probed"]), bool(z["plugin_graph"])), kernel


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[384, 640], help="swin-tiny sizes (none: skip it)")
    parser.add_argument("--demo", action="store_true", help="also the demo checkpoint at 160 px")
    parser.add_argument(
        "--files", nargs="+", default=["fp32", "int8", "int8-all"], choices=["fp32", "int8", "int8-all"]
    )
    parser.add_argument("--emulator", default="qemu-x86_64 -cpu max", help="the command that runs a binary emulated")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints and exports here (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--probe", nargs=3, type=Path, metavar=("MODEL", "INPUT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(*args.probe, args.layers)
        return 0

    emulator = shlex.split(args.emulator)
    out = {
        "machine": machine_info(available_cpus()),
        "emulator": args.emulator,
        "native_int8_kernel": cpu_int8_kernel(),
    }
    out["reference"] = {"aten": torch.backends.cpu.get_cpu_capability(), **{k: os.environ.get(k) for k in ISA_CAPS}}
    out["rows"] = []
    print(f"{datetime.date.today()} {out['machine']['cpu']}; emulator: {args.emulator}; reference {out['reference']}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        setting = full_setting()
        models = []
        if args.sizes:
            folder = build_checkpoint(setting, checkpoint_folder(work, setting, 0), 0)
            models += [("swin-tiny", folder, size) for size in args.sizes]
        if args.demo:
            models.append(("demo", Path(DEMO_WEIGHTS), 160))
        for name, folder, size in models:
            model = load_model(folder).eval()
            layers = model.config.decoder_layers
            files = int8_exports(folder, work, size, name)
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()
            x_path = work / f"{name}-{size}.input.npy"
            np.save(x_path, x)
            with torch.inference_mode():
                ref_mask = model(torch.from_numpy(x)).mask_logits.numpy()
            for kind in args.files:
                path = files[kind]
                tolerance = TOLERANCE["float32"] if kind == "fp32" else INT8_TOLERANCE
                t0 = time.perf_counter()
                places = {"native": (run_probed(path, layers, [x])[0], cpu_int8_kernel())}
                places["emulated"] = emulated(emulator, path, x_path, layers, work)
                row = {"model": name, "size": size, "file": kind, "tolerance": tolerance}
                for place, (got, kernel) in places.items():
                    (result,) = check_against_pytorch(path, model, [x], tolerance, onnx_outputs=[got])
                    row[place] = {
                        "int8_kernel": kernel,
                        "passed": result.passed,
                        "check": result.describe(),
                        "mask_flips": result.mask_flips,
                        "mask_sign": float((np.sign(got.arrays[1]) == np.sign(ref_mask)).mean()),
                    }
                native, emul = places["native"][0].arrays, places["emulated"][0].arrays
                row["emulated_vs_native"] = {"class_rel": rel(emul[0], native[0]), "mask_rel": rel(emul[1], native[1])}
                out["rows"].append(row)
                print(f"{name} {size}x{size} {kind} ({time.perf_counter() - t0:.0f} s):")
                for place in places:
                    r = row[place]
                    print(
                        f"  {place:8s} kernel {r['int8_kernel']:10s} {'passed' if r['passed'] else 'FAILED'}, "
                        f"mask signs {r['mask_sign']:.3%}; {r['check']}"
                    )
                d = row["emulated_vs_native"]
                print(f"  emulated vs native: class rel {d['class_rel']:.1e}, mask rel {d['mask_rel']:.1e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(r[p]["passed"] for r in out["rows"] for p in ("native", "emulated")) else 1


if __name__ == "__main__":
    sys.exit(main())
