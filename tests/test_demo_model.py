"""The committed demo model: it loads by default, is small, and scores what its model card records.

``weights/evaluate_demo.py`` wrote ``weights/demo/metrics.json``; here the first held-out images are
generated again and evaluated through ``m2f eval``'s code, and must give the recorded numbers. The
tolerance covers float differences between machines (a boundary pixel or a borderline segment), not a
different model: 0.5 PQ / AP / mIoU points on the small subset.
"""

from __future__ import annotations

import json

import pytest

from m2f import synth
from m2f.evaluate import evaluate
from mask2former import load_model
from mask2former.weights import DEMO_WEIGHTS

RECORD = json.loads((DEMO_WEIGHTS / "metrics.json").read_text())
TOLERANCE = 0.5


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def heldout_subset(tmp_path_factory):
    subset = RECORD["test_subset"]
    folder = tmp_path_factory.mktemp("heldout")
    synth.write_dataset(folder, subset["num_images"], subset["seed"])
    return folder


@pytest.fixture(scope="module")
def scores(model, heldout_subset):
    return {
        t: evaluate(model, heldout_subset, t, progress=False)["metrics"] for t in ("panoptic", "instance", "semantic")
    }


def test_demo_is_the_default_and_small(model):
    assert model.config.name == "mask2former-demo-synth"
    assert model.config.labels == [c["name"] for c in synth.CATEGORIES]
    assert model.config.thing_ids == {c["id"] for c in synth.CATEGORIES if c["isthing"]}
    assert model.config.threshold == RECORD["threshold"]
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert (DEMO_WEIGHTS / "model.safetensors").stat().st_size < 16 * 2**20


def test_recorded_heldout_quality():
    heldout = RECORD["heldout"]
    assert heldout["seed"] != json.loads((DEMO_WEIGHTS / "training.json").read_text())["args"]["seed"]
    assert heldout["num_images"] >= 500
    assert heldout["panoptic"]["all"]["pq"] >= 60


@pytest.mark.parametrize(
    ("task", "path"),
    [
        ("panoptic", ("all", "pq")),
        ("panoptic", ("things", "pq")),
        ("panoptic", ("stuff", "pq")),
        ("instance", ("AP",)),
        ("semantic", ("mIoU",)),
    ],
)
def test_heldout_subset_scores_as_recorded(scores, task, path):
    got, want = scores[task], RECORD["test_subset"][task]
    for key in path:
        got, want = got[key], want[key]
    assert got == pytest.approx(want, abs=TOLERANCE), f"{task} {'/'.join(path)}: {got:.2f}, recorded {want:.2f}"


def test_onnx_export_scores_the_same_pq(demo_onnx, scores, heldout_subset):
    """The demo model exported to ONNX (160x160; tests/conftest.py) and run in ONNX Runtime gives the same
    PQ as in PyTorch."""
    from runtimes.onnx_runner import OnnxRunner

    runner = OnnxRunner(demo_onnx, threads=2)
    onnx_pq = evaluate(runner, heldout_subset, "panoptic", batch_size=4, progress=False)["metrics"]
    for split in ("all", "things", "stuff"):
        assert onnx_pq[split]["pq"] == pytest.approx(scores["panoptic"][split]["pq"], abs=1e-9)


def test_int8_export_loses_little_pq(demo_onnx_int8, scores, heldout_subset):
    """int8 weights (dynamic quantization, for the CPU): panoptic PQ within 1 point of PyTorch's on the
    held-out subset (bench/onnxruntime_vs_eager.py --int8 measures it on 500 images)."""
    from runtimes.onnx_runner import OnnxRunner

    int8_pq = evaluate(OnnxRunner(demo_onnx_int8, threads=2), heldout_subset, "panoptic", batch_size=4, progress=False)
    assert int8_pq["metrics"]["all"]["pq"] == pytest.approx(scores["panoptic"]["all"]["pq"], abs=1.0)
