"""Which runner serves an exported graph on which CPU: one table keyed by the CPU's class, measured once at start.

The class comes from what this CPU measurably does, as the int8 kernel probe (:func:`model_format.int8.cpu_int8_kernel`)
measures how ONNX Runtime multiplies int8 here, plus the AMX flags the kernel reports:

- ``amx``: AMX tiles with bf16 (Intel Sapphire Rapids and later): bf16 matmuls several times faster than fp32;
- ``avx512-vnni``: AVX-512 with VNNI (Intel Cascade Lake .. Ice Lake, AMD Zen 4/5): exact u8 x s8 int8;
- ``avx2``: no VNNI (the probe's int16 pair sums saturate; AMD Zen 1-3, older Intel) or AVX-VNNI without AVX-512;
- ``other``: not x86 (ARM and the rest).

A runner other than ONNX Runtime becomes the default for a class only where it was measured side by side
(``bench/cpu_runtimes.py``) to be at least 15 % faster at equal accuracy; the ``why`` of each row says what was
measured, and where (BENCHMARKS.md, "The CPU forward pass per CPU class"). No tuning while serving.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from model_format.int8 import cpu_int8_kernel

CPU_CLASSES = ("amx", "avx512-vnni", "avx2", "other")


@dataclass(frozen=True)
class Choice:
    runtime: str  # a runtime name open_runner takes: "onnxruntime", "openvino", "openvino-bf16"
    why: str


DEFAULT_RUNNER: dict[str, Choice] = {
    "amx": Choice(
        "onnxruntime",
        "not measured: no AMX host was available (2026-12-08). OpenVINO f32 is the candidate for the default (it was "
        "at the 15 % bar on AVX-512 VNNI); adopt it here once bench/cpu_runtimes.py --check on an AMX host shows "
        ">= 15 % at both sizes. bf16 (OpenVINO's, 1.38-1.55x PyTorch's autocast on AVX512_BF16) stays opt-in as on "
        "every class ('openvino-bf16'): it would change an fp32 file's answers to int8's accuracy",
    ),
    "avx512-vnni": Choice(
        "onnxruntime",
        "measured on an AMD EPYC (Zen 4: AVX512_VNNI and AVX512_BF16, no AMX; 2 cores; 2026-12-07 and -08), swin-tiny "
        "batch 1, 384/640 px, vs ONNX Runtime fp32: OpenVINO f32 1.10-1.14x / 1.16-1.21x at equal accuracy (not "
        ">= 15 % at both sizes); OpenVINO bf16 1.87-1.89x but at int8's accuracy, not fp32's (99.6 % mask signs; opt "
        "in with 'openvino-bf16'); ONNX Runtime int8 (mixed precision) 1.21-1.24x, an export choice",
    ),
    "avx2": Choice(
        "onnxruntime",
        "measured on an AMD EPYC with AVX2 only (issue 32, 2026-12-07): OpenVINO f32 1.05-1.15x faster than ONNX "
        "Runtime fp32, under the 15 % bar; OpenVINO runs int8 graphs slower than ONNX Runtime. The mixed int8 "
        "export passes the exporter's check with ONNX Runtime's AVX2 kernels (emulated, bench/int8_emulated.py)",
    ),
    "other": Choice("onnxruntime", "not x86: ONNX Runtime runs everywhere; nothing else was measured"),
}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def classify(kernel: str, flags: set[str]) -> str:
    """The CPU class from the int8 kernel probe's answer (``cpu_int8_kernel``) and the CPU's feature flags."""
    if kernel == "exact":
        return "other"
    if {"amx_tile", "amx_bf16"} <= flags:
        return "amx"
    if kernel == "vnni" and "avx512f" in flags:
        return "avx512-vnni"
    return "avx2"


@functools.cache
def cpu_class() -> str:
    """This CPU's class (:data:`CPU_CLASSES`), measured once per process."""
    return classify(cpu_int8_kernel(), _cpu_flags())


def default_runtime() -> tuple[str, str, str]:
    """(CPU class, the runtime :data:`DEFAULT_RUNNER` picks for it, why)."""
    cls = cpu_class()
    return cls, DEFAULT_RUNNER[cls].runtime, DEFAULT_RUNNER[cls].why
