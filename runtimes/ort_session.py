"""How we open ONNX Runtime sessions: the one place both the runner (:mod:`runtimes.onnx_runner`) and the
exporter's check (:mod:`model_export.check`) take their session settings from.

Every graph optimization ONNX Runtime has (``ORT_ENABLE_ALL``) except the CPU fusions that slow these graphs
down, one intra-op thread per core this process may use (CPU affinity and a cgroup CPU quota are honoured),
denormals flushed to zero, idle threads that sleep. No torch here.
"""

from __future__ import annotations

import hashlib
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxruntime as ort

from runtimes.runner import available_cpus  # noqa: F401  (re-exported: the runner and benches read it here)


def hardware_tag() -> str:
    """A short digest of the CPU kind (architecture and feature flags): ONNX Runtime's fully optimized graphs
    use kernels laid out for the CPU's vector width, so a cached one is only valid on the same kind."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


# ONNX Runtime fusions that make these graphs slower on the CPU (measured interleaved against the default by
# bench/onnxruntime_settings.py; figures in BENCHMARKS.md): SkipLayerNormalization (residual Add + LayerNorm)
# and MatMul + Add -> Gemm. Other providers keep them.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion", "MatMulAddFusion")


def disabled_optimizers(providers: list[str]) -> list[str]:
    """The graph optimizers we turn off for these providers."""
    return list(CPU_DISABLED_OPTIMIZERS) if providers == ["CPUExecutionProvider"] else []


def open_session(source: str | bytes, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """An inference session on ``source`` (a path or a serialized model) with our graph-optimizer choices.

    Made on a throwaway thread: with ``session.set_denormal_as_zero`` ONNX Runtime switches the creating
    thread to flush-to-zero / denormals-are-zero (as well as its own pool threads), which would silently
    change the caller's float arithmetic (Python floats, numpy; hypothesis refuses to run under it). Running
    the session later does not touch the caller's mode."""
    with ThreadPoolExecutor(1, thread_name_prefix="ort-open") as pool:
        return pool.submit(
            ort.InferenceSession,
            source,
            options,
            providers=providers,
            disabled_optimizers=disabled_optimizers(providers),
        ).result()


def session_options(threads: int) -> ort.SessionOptions:
    """How we run Mask2Former graphs on the CPU: all graph optimizations, ``threads`` intra-op threads."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # the graph is one chain of big ops; parallelism is within ops
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Flush denormals to zero: softmax over masked scores (Swin's -100 shift mask, masked attention) and
    # activation tails produce them, and x86 handles them in slow microcode. Faster, and the outputs were
    # identical where measured (bench/onnxruntime_settings.py, BENCHMARKS.md).
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    # Idle intra-op threads sleep instead of spinning: the service decodes and post-processes in other
    # threads on the same cores, and spinning threads take their time; alone, both run about as fast
    # (bench/spin_wait.py, BENCHMARKS.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts
