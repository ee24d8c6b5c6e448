"""The OpenVINO runner (runtimes.openvino_runner) against ONNX Runtime on the same exported file, and the table
that picks a runner per CPU class (runtimes.cpu_class)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from model_export.check import TOLERANCE  # noqa: E402
from runtimes import open_runner  # noqa: E402
from runtimes.cpu_class import CPU_CLASSES, DEFAULT_RUNNER, classify, cpu_class  # noqa: E402
from runtimes.onnx_runner import OnnxRunner  # noqa: E402
from runtimes.openvino_runner import OpenVinoRunner  # noqa: E402


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_openvino_f32_equals_onnxruntime(demo_onnx, tmp_path):
    """The demo export (dynamic batch, 160x160) in OpenVINO at f32 precision gives ONNX Runtime's outputs within
    the exporter's float32 tolerance, through the same small interface."""
    ort = OnnxRunner(demo_onnx, threads=2)
    ov = open_runner(demo_onnx, "openvino", threads=2, cache_dir=tmp_path / "ov-cache")
    assert isinstance(ov, OpenVinoRunner) and ov.name == "openvino"
    assert ov.input == ort.input and ov.config == ort.config
    assert ov.describe()["precision"] == "f32" and ov.describe()["threads"] == 2
    x = np.random.default_rng(0).normal(size=(2, 3, 160, 160)).astype(np.float32)
    for got, want in zip(ov.run(x), ort.run(x), strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert rel(got, want) <= TOLERANCE["float32"]
    ov.warmup()
    with pytest.raises(ValueError, match="axis 2"):
        ov.run(np.zeros((1, 3, 128, 160), np.float32))
    with pytest.raises(ValueError, match="floating point"):
        ov.run(np.zeros((1, 3, 160, 160), np.uint8))


def test_openvino_bf16_runs_and_says_so(demo_onnx):
    """bf16 inference precision: a different, coarser arithmetic (its accuracy is measured in bench/cpu_runtimes.py,
    not assumed); the runner reports the precision it compiled with."""
    runner = open_runner(demo_onnx, "openvino-bf16", threads=2)
    assert runner.describe()["precision"] == "bf16"
    class_logits, mask_logits = runner.run(np.zeros((1, 3, 160, 160), np.float32))
    assert np.isfinite(class_logits).all() and mask_logits.shape == (1, *mask_logits.shape[1:])
    with pytest.raises(ValueError, match="precision"):
        OpenVinoRunner(demo_onnx, precision="int4")


def test_export_check_judges_openvino(demo_onnx):
    """The exporter's check runs the graph in OpenVINO as its runner compiles it (``run_probed(openvino=...)``):
    f32 passes at the float32 tolerance with no attention-mask flip; bf16 passes at the int8 tolerance, the
    accuracy class this project gives it (bench/cpu_runtimes.py --check measures both on swin-tiny)."""
    import torch

    from mask2former import load_model
    from mask2former.weights import DEMO_WEIGHTS
    from model_export.check import INT8_TOLERANCE, check_against_pytorch, run_probed

    model = load_model(DEMO_WEIGHTS).eval()
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0)).numpy()
    layers = model.config.decoder_layers
    (f32,) = run_probed(demo_onnx, layers, [x], openvino="f32")
    assert f32.probed and len(f32.arrays) == 2 + 2 * layers and f32.arrays[-1].dtype == np.bool_
    (result,) = check_against_pytorch(None, model, [x], TOLERANCE["float32"], onnx_outputs=[f32])
    assert result.passed and result.mask_flips == 0, result.describe()
    (bf16,) = run_probed(demo_onnx, layers, [x], openvino="bf16")
    (result,) = check_against_pytorch(None, model, [x], INT8_TOLERANCE, onnx_outputs=[bf16])
    assert result.passed, result.describe()


@pytest.mark.parametrize(
    ("kernel", "flags", "expected"),
    [
        ("saturating", {"avx2"}, "avx2"),
        ("vnni", {"avx2", "avx_vnni"}, "avx2"),  # AVX-VNNI without AVX-512: the AVX2 width
        ("vnni", {"avx2", "avx512f", "avx512_vnni"}, "avx512-vnni"),
        ("vnni", {"avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}, "amx"),
        ("exact", {"asimd"}, "other"),
    ],
)
def test_cpu_classes(kernel, flags, expected):
    assert classify(kernel, flags) == expected


def test_every_class_has_a_default_with_a_reason(demo_onnx):
    assert set(DEFAULT_RUNNER) == set(CPU_CLASSES) and cpu_class() in CPU_CLASSES
    assert all(
        choice.why and choice.runtime in ("onnxruntime", "openvino", "openvino-bf16")
        for choice in DEFAULT_RUNNER.values()
    )
    runner = open_runner(demo_onnx, "auto", threads=1)
    assert runner.name == {"onnxruntime": "onnxruntime"}.get(DEFAULT_RUNNER[cpu_class()].runtime, "openvino")
    with pytest.raises(ValueError, match="unknown runtime"):
        open_runner(demo_onnx, "tensorflow")


def test_the_service_serves_an_onnx_file_with_the_runner_its_cpu_class_gets(demo_onnx, monkeypatch, caplog):
    """`m2f serve` opens an .onnx model with the runner the table picks for this CPU's class (not ONNX Runtime
    whatever the table says): with the table's answer replaced, the model loads in OpenVINO, and the log says
    which class gave which runner and why."""
    import logging

    from service import models
    from service.settings import Settings

    monkeypatch.setattr(models, "default_runtime", lambda: ("amx", "openvino-bf16", "a measured reason"))
    settings = Settings(model=str(demo_onnx), max_batch_size=1, threads=1)
    with caplog.at_level(logging.INFO, logger="m2f.service"):
        version = models.load_version("default", 1, demo_onnx, settings)
    assert version.runner.name == "openvino" and version.runner.describe()["precision"] == "bf16"
    assert "CPU class amx: runtime openvino-bf16 (a measured reason)" in caplog.text
