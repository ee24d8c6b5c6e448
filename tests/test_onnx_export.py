"""ONNX export and the ONNX Runtime runner.

One dynamic-shape, dynamic-batch export of the tiny config serves most tests (exports take tens of
seconds); the swin-tiny COCO-panoptic architecture, a fixed-shape export through the CLI and a float16
export have one export each.

Tolerance: max |ONNX Runtime - PyTorch| <= 1e-4 x max |PyTorch| for each output (float32). Masked
attention thresholds mask logits at 0, so a logit within rounding of 0 could flip an attention-mask bit
between two correct implementations; the exporter's check reads every layer's mask logits out of ONNX
Runtime and counts such flips, and these tests assert that none happened on their inputs, so the
outputs are compared whole, at the full tolerance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")  # the random-weight checkpoints are written with save_pretrained

import onnx  # noqa: E402
from torch_postprocess import panoptic_segmentation, semantic_segmentation  # noqa: E402

from mask2former import load_model  # noqa: E402
from mask2former.reference import TINY, architecture, save_hf_checkpoint  # noqa: E402
from model_export.check import ExportCheckError, check_against_pytorch  # noqa: E402
from model_export.graph import float_tensor_types  # noqa: E402
from model_export.onnx import export_onnx  # noqa: E402
from model_format import int8  # noqa: E402
from model_format.metadata import ExportMetadata, checkpoint_sha256, read_metadata, write_metadata  # noqa: E402
from runtimes.onnx_runner import OnnxRunner  # noqa: E402
from runtimes.ort_session import available_cpus  # noqa: E402

# torch's own export internals warn about their pytree API; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")

REL_TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def rel_diff(a: np.ndarray, b: torch.Tensor) -> float:
    b = b.numpy()
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny config with random weights, adjusted so that post-processing has something to compare.

    With plain random weights every query ends up predicting the same class everywhere (the residual stream
    forgets the query), so semantic maps are one label and no panoptic segment survives. Damping the
    decoder layers' output projections keeps the queries apart, and scaling the class and mask heads makes
    their predictions confident. Labels 0-2 are things, 3-4 stuff.
    """
    from safetensors.torch import load_file, save_file

    folder = save_hf_checkpoint(TINY, tmp_path_factory.mktemp("tiny-ckpt"), seed=1)
    state = load_file(folder / "model.safetensors")
    for key in state:
        if key.startswith("model.transformer_module.decoder.layers.") and key.endswith(
            ("out_proj.weight", "fc2.weight")
        ):
            state[key] = state[key] * 0.1
        elif key.endswith(("class_predictor.weight", "mask_embedder.2.0.weight")):
            state[key] = state[key] * 3
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "thing_ids": [0, 1, 2]}))
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return load_model(tiny_folder)


@pytest.fixture(scope="module")
def tiny_export(tiny_folder, tmp_path_factory):
    """One dynamic-shape, dynamic-batch export, checked at batch 1 (128x192) and batch 3 (200x136)."""
    path = tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx"
    report = export_onnx(tiny_folder, path, dynamic_shape=True, dynamic_batch=True)
    return path, report


# ---------------------------------------------------------------------------------------------- exporter
def test_tiny_export_is_checked(tiny_export, tiny_model):
    path, report = tiny_export
    assert report.path == path and path.is_file()
    assert report.passed and report.checked
    assert [c.input_shape for c in report.checks] == [(1, 3, 128, 192), (3, 3, 200, 136)]
    for c in report.checks:
        assert c.mask_flips == 0, "inputs are chosen flip-free, so the outputs are compared whole"
        assert set(c.max_abs_diff) == {"class_logits", "mask_logits"}
        assert max(c.rel_diff.values()) <= REL_TOL
    assert report.input_shape == ("batch", 3, "height", "width")
    q, k = tiny_model.config.num_queries, tiny_model.config.num_labels + 1
    assert report.output_shapes["class_logits"] == ("batch", q, k)
    assert report.output_shapes["mask_logits"][:2] == ("batch", q)
    assert report.opset == 20 and report.dtype == "float32"
    assert {"GridSample", "Softmax", "MatMul", "Einsum"} <= set(report.op_types)
    assert all("::" not in op for op in report.op_types), "standard ONNX ops only"
    assert [o.name for o in onnx.load(str(path), load_external_data=False).graph.output] == [
        "class_logits",
        "mask_logits",
    ]
    assert set(report.timings) and all(t >= 0 for t in report.timings.values())


def test_every_float_tensor_is_float32(tiny_export):
    path, _ = tiny_export
    types = float_tensor_types(onnx.load(str(path)))
    assert len(types) > 100  # inferred intermediates are covered, not just inputs and weights
    assert set(types.values()) == {"float32"}


def test_float_scan_finds_float64():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE), helper.make_node("Cast", ["y"], ["z"], to=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
    )
    types = float_tensor_types(helper.make_model(graph))
    assert types["y"] == "float64" and types["x"] == types["z"] == "float32"


def test_check_detects_a_wrong_model(tiny_export, tiny_folder):
    path, _ = tiny_export
    other = load_model(tiny_folder)
    with torch.no_grad():
        other.decoder.class_head.bias.add_(0.05)
    (result,) = check_against_pytorch(path, other, [(1, 3, 64, 96)])
    assert not result.passed and result.rel_diff["class_logits"] > REL_TOL


def test_check_compares_onnx_outputs_computed_apart(tiny_export, tiny_model):
    """The check's ONNX Runtime half can run elsewhere (under a CPU emulator: bench/int8_emulated.py): its saved
    results give the same verdict as a check run whole, and they are what is compared (a moved output, or a
    flipped attention-mask bit far from a 0 logit, fails the check without the graph being run)."""
    from model_export.check import ProbedOutputs, run_probed

    path, _ = tiny_export
    x = inputs((1, 3, 64, 96), seed=3)[0]
    (got,) = run_probed(path, tiny_model.config.decoder_layers, [x])
    assert got.probed and len(got.arrays) == 2 + 2 * tiny_model.config.decoder_layers
    (whole,) = check_against_pytorch(path, tiny_model, [x])
    (apart,) = check_against_pytorch(None, tiny_model, [x], onnx_outputs=[got])
    assert whole.passed and apart.passed and apart.max_abs_diff == whole.max_abs_diff

    moved = [a.copy() for a in got.arrays]
    moved[0] += 0.01 * np.abs(moved[0]).max()  # class logits
    (result,) = check_against_pytorch(None, tiny_model, [x], onnx_outputs=[ProbedOutputs(moved, True, False)])
    assert not result.passed and result.rel_diff["class_logits"] > REL_TOL

    layers = tiny_model.config.decoder_layers
    with torch.inference_mode():
        level0 = tiny_model(torch.from_numpy(x), aux=True).attention_logits[0][0]  # (Q, S) layer 0's logits
    flipped = [a.copy() for a in got.arrays]
    q, s = np.unravel_index(int(level0.argmax()), level0.shape)  # the largest logit: attended, far from 0
    assert level0[q, s] > 0.5 * level0.abs().max()
    flipped[2 + layers][..., q, s] = ~flipped[2 + layers][..., q, s]  # layer 0's attention mask
    (result,) = check_against_pytorch(None, tiny_model, [x], onnx_outputs=[ProbedOutputs(flipped, True, False)])
    assert not result.passed and result.first_flip_layer == 0 and not result.flips_near_zero


def test_attention_mask_flips_are_attributed():
    """A flipped attention-mask bit is accepted only where the logit is within the tolerance of 0."""
    from mask2former.attention_mask import attention_mask_at_level
    from model_export.check import CheckResult, _find_flips

    logits = torch.full((1, 2, 4), 3.0)  # the mask logits layer 0 attended with (B, Q, S), a 2x2 level
    logits[0, 1, 2:] = -3.0
    logits[0, 0, 0] = 1e-6
    # (query, pixel, logit near 0): query 0 at pixel 0 is 1e-6, the other logits are +-3.
    for query, pixel, near in ((0, 0, True), (0, 3, False), (1, 0, False)):
        flipped = attention_mask_at_level(logits).clone()
        flipped[0, 0, query, pixel] = ~flipped[0, 0, query, pixel]
        result = CheckResult((1, 3, 64, 64), {}, {}, REL_TOL)
        _find_flips(result, [flipped], [logits], REL_TOL)
        assert (result.mask_flips, result.first_flip_layer, result.flips_near_zero) == (1, 0, near)
    # A row blocked everywhere in PyTorch (hence fully open) whose logits are all near 0: ONNX Runtime may see
    # one of them positive and open only that pixel; every other bit of the row flips, all explained.
    near_blocked = logits.clone()
    near_blocked[0, 1] = -1e-6
    flipped = attention_mask_at_level(near_blocked).clone()
    flipped[0, 0, 1, 1:] = False
    result = CheckResult((1, 3, 64, 64), {}, {}, REL_TOL)
    _find_flips(result, [flipped], [near_blocked], REL_TOL)
    assert (result.mask_flips, result.flips_near_zero) == (3, True)
    result = CheckResult((1, 3, 64, 64), {}, {}, REL_TOL)
    _find_flips(result, [attention_mask_at_level(logits)], [logits], REL_TOL)
    assert result.mask_flips == 0 and result.first_flip_layer is None and result.passed


def test_metadata_travels_in_the_file(tiny_export, tiny_folder, tiny_model):
    path, report = tiny_export
    meta = read_metadata(path)
    cfg = meta.to_config()
    ref = tiny_model.config
    assert cfg.id2label == ref.id2label and cfg.thing_ids == ref.thing_ids
    assert cfg.preprocess == ref.preprocess
    assert (cfg.threshold, cfg.mask_threshold, cfg.overlap_mask_area_threshold) == (
        ref.threshold,
        ref.mask_threshold,
        ref.overlap_mask_area_threshold,
    )
    assert cfg.to_hf_dict() == ref.to_hf_dict()
    assert meta.input_shape == ("batch", 3, "height", "width") and meta.dtype == "float32"
    assert meta.source == str(tiny_folder.resolve())
    assert meta.source_sha256 == checkpoint_sha256(tiny_folder)[0]
    weights = tiny_folder / "model.safetensors"
    assert meta.source_files["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta.check["tolerance"] == REL_TOL and meta.check["max_rel_diff"] <= REL_TOL
    assert meta.check["inputs"] == [[1, 3, 128, 192], [3, 3, 200, 136]]
    # Flat keys for tools that do not parse the JSON document.
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert props["m2f.source_sha256"] == meta.source_sha256 and props["m2f.num_labels"] == str(ref.num_labels)
    assert ExportMetadata.from_props(props) == meta
    with pytest.raises(ValueError, match="not a graph exported"):
        ExportMetadata.from_props({})


# ---------------------------------------------------------------------------------------------- runner
def inputs(*shapes: tuple[int, int, int, int], seed: int = 7) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.standard_normal(s).astype(np.float32) for s in shapes]


# Batch 1 and 3 and two image sizes (one not a multiple of 32), other than the export check's.
RUNNER_INPUTS = inputs((1, 3, 160, 224), (3, 3, 96, 136))


def test_runner_matches_pytorch(tiny_export, tiny_model):
    path, _ = tiny_export
    for result in check_against_pytorch(path, tiny_model, RUNNER_INPUTS):
        assert result.passed and result.mask_flips == 0, result.describe()
    runner = OnnxRunner(path)
    assert runner.input.shape == ("batch", 3, "height", "width") and runner.input.batch is None
    for x in RUNNER_INPUTS:
        class_logits, mask_logits = runner.run(x)
        with torch.inference_mode():
            ref = tiny_model(torch.from_numpy(x))
        b, _, h, w = x.shape
        assert class_logits.shape == tuple(ref.class_logits.shape) and class_logits.shape[0] == b
        assert mask_logits.shape == (b, tiny_model.config.num_queries, -(-h // 4), -(-w // 4))
        assert class_logits.dtype == mask_logits.dtype == np.float32
        assert rel_diff(class_logits, ref.class_logits) <= REL_TOL
        assert rel_diff(mask_logits, ref.mask_logits) <= REL_TOL


def test_postprocessed_results_are_identical(tiny_export, tiny_model):
    """Semantic maps and panoptic segments from ONNX Runtime's logits equal those from PyTorch's."""
    path, _ = tiny_export
    runner = OnnxRunner(path)
    x = RUNNER_INPUTS[1]  # batch 3, 96x136
    resized = [(96, 130), (90, 136), (96, 136)]  # images inside the padded batch
    original = [(192, 260), (45, 68), (96, 136)]
    class_logits, mask_logits = runner.run(x)
    with torch.inference_mode():
        ref = tiny_model(torch.from_numpy(x))
    args = (resized, original)
    sem_ort = semantic_segmentation(class_logits, mask_logits, *args)
    sem_ref = semantic_segmentation(ref.class_logits, ref.mask_logits, *args)
    for a, b in zip(sem_ort, sem_ref, strict=True):
        assert torch.equal(a, b)
    assert len(torch.unique(torch.cat([m.flatten() for m in sem_ref]))) > 1
    kw = {"thing_ids": tiny_model.config.thing_ids, "threshold": 0.4, "overlap_mask_area_threshold": 0.5}
    pan_ort = panoptic_segmentation(class_logits, mask_logits, *args, **kw)
    pan_ref = panoptic_segmentation(ref.class_logits, ref.mask_logits, *args, **kw)
    segments = 0
    for a, b in zip(pan_ort, pan_ref, strict=True):
        assert torch.equal(a.segmentation, b.segmentation)
        assert [s._replace(score=0.0) for s in a.segments] == [s._replace(score=0.0) for s in b.segments]
        assert np.allclose([s.score for s in a.segments], [s.score for s in b.segments], rtol=1e-5, atol=0)
        segments += len(b.segments)
    assert segments >= 3, "the comparison needs segments to compare"


def _flushes_subnormals() -> bool:
    """Whether this thread flushes subnormal results to zero (FTZ/DAZ): half the smallest normal is 0."""
    smallest_normal = sys.float_info.min
    return smallest_normal / 2 == 0.0


def test_opening_a_runner_leaves_the_callers_float_mode_alone(tiny_export):
    # ONNX Runtime sets FTZ/DAZ on the thread that creates a session with set_denormal_as_zero; a runner
    # opened in the caller's thread switched the caller to it (CI: hypothesis refused to run afterwards).
    assert not _flushes_subnormals()
    runner = OnnxRunner(tiny_export[0])
    runner.run(np.zeros((1, 3, 64, 64), np.float32))
    assert not _flushes_subnormals()


def test_runner_rejects_bad_input(tiny_export):
    runner = OnnxRunner(tiny_export[0])
    with pytest.raises(ValueError, match="B, 3, H, W"):
        runner.run(np.zeros((1, 4, 64, 64), np.float32))
    with pytest.raises(ValueError, match="floating point"):
        runner.run(np.zeros((1, 3, 64, 64), np.uint8))


NO_TORCH_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from runtimes.onnx_runner import OnnxRunner
from pipeline.processing import preprocess

path, cache = sys.argv[1], sys.argv[2]
runner = OnnxRunner(path, cache_dir=cache)
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))
pre = runner.config.preprocess
batch = preprocess([image], pre.__class__(shortest_edge=64, longest_edge=96, mean=pre.mean, std=pre.std))
class_logits, mask_logits = runner.run(batch.pixel_values)
opts = runner.session.get_session_options()
print(json.dumps({
    "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
    "shape": list(batch.pixel_values.shape),
    "outputs": [list(class_logits.shape), list(mask_logits.shape)],
    "cache_hit": runner.cache_hit,
    "cache_path": str(runner.cache_path),
    "threads": opts.intra_op_num_threads,
    "level": str(opts.graph_optimization_level),
    "labels": runner.config.labels,
    "mask_sum": float(np.abs(mask_logits).sum()),
}))
"""


def test_runner_runs_without_torch_and_caches_the_optimized_graph(tiny_export, tiny_model, tmp_path):
    """A fresh interpreter: preprocess with numpy/PIL, run the graph, never import torch."""
    path, _ = tiny_export
    cache = tmp_path / "ort-cache"

    def run() -> dict:
        cmd = [sys.executable, "-c", textwrap.dedent(NO_TORCH_SCRIPT), str(path), str(cache)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["torch"] == [] and second["torch"] == []
    assert first["shape"] == [1, 3, 64, 96]  # 70x90 -> 64x82, padded to 64x96
    assert first["outputs"] == [[1, 10, 6], [1, 10, 16, 24]]
    assert first["labels"] == tiny_model.config.labels
    assert first["threads"] == available_cpus() and first["level"].endswith("ORT_ENABLE_ALL")
    assert not first["cache_hit"] and second["cache_hit"]
    assert Path(first["cache_path"]).is_file() and first["cache_path"] == second["cache_path"]
    assert OnnxRunner(path).sha256[:32] in first["cache_path"]  # keyed by the model file's hash
    assert first["mask_sum"] == pytest.approx(second["mask_sum"], rel=1e-6)
    # The cached graph is optimized with the CPU fusions we turn off (runtimes.ort_session.open_session):
    # neither SkipLayerNormalization nor a Gemm made from a MatMul (the graph's own Gemms are 2-D linears).
    import onnx

    optimized = Counter(n.op_type for n in onnx.load(first["cache_path"]).graph.node)
    exported = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert optimized["SkipLayerNormalization"] == 0 and optimized["LayerNormalization"] > 0
    assert optimized["Gemm"] <= exported["Gemm"]


# ---------------------------------------------------------------------------------------------- other exports
def test_cli_fixed_shape_export(tiny_folder, tiny_model, tmp_path, capsys):
    from model_export.cli import add_export_parser

    parser = argparse.ArgumentParser(prog="m2f")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "fixed.onnx"
    args = parser.parse_args(
        ["export", "onnx", "--weights", str(tiny_folder), "-o", str(out), "--height", "96", "--width", "128"]
        + ["--batch", "2"]
    )
    assert args.run(args) == 0
    captured = capsys.readouterr()
    assert "[1/6] load the model" in captured.err and "done in" in captured.err
    assert "check 2x3x96x128" in captured.out and "ok at tolerance 0.0001" in captured.out
    runner = OnnxRunner(out)
    assert runner.input.shape == (2, 3, 96, 128) and runner.input.size == (96, 128)
    (x,) = inputs((2, 3, 96, 128), seed=3)
    class_logits, mask_logits = runner.run(x)
    with torch.inference_mode():
        ref = tiny_model(torch.from_numpy(x))
    assert rel_diff(class_logits, ref.class_logits) <= REL_TOL and rel_diff(mask_logits, ref.mask_logits) <= REL_TOL
    with pytest.raises(ValueError, match="exported for 96"):
        runner.run(np.zeros((2, 3, 64, 128), np.float32))
    with pytest.raises(ValueError, match="exported for 2"):
        runner.run(np.zeros((1, 3, 96, 128), np.float32))


def test_fp16_export(tiny_folder, tmp_path):
    path = tmp_path / "fp16.onnx"
    report = export_onnx(tiny_folder, path, height=128, width=128, fp16=True, log=None)
    assert report.passed and report.dtype == "float16" and report.tolerance == 2e-2
    assert set(float_tensor_types(onnx.load(str(path))).values()) == {"float16"}
    runner = OnnxRunner(path)
    assert runner.input.dtype == np.float16
    class_logits, mask_logits = runner.run(np.zeros((1, 3, 128, 128), np.float32))
    assert class_logits.dtype == np.float32 and np.isfinite(mask_logits).all()


@pytest.fixture(scope="module")
def tiny_int8(tiny_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "int8.onnx"
    return path, export_onnx(tiny_folder, path, height=128, width=128, quantize="int8", log=None)


def test_int8_export(tiny_int8, tiny_model):
    """Dynamic int8 quantization: MatMul weights quantized to int8 and stored as uint8, checked at the int8
    tolerance, and the runner serves it; its outputs stay close to PyTorch's (a few percent of their range
    at most)."""
    path, report = tiny_int8
    assert report.passed and report.tolerance == 0.1 and report.dtype == "float32"
    assert report.metadata.quantization == "int8-dynamic" and report.op_types["MatMulInteger"] > 0
    assert not any("::" in op for op in report.op_types)  # still standard ONNX ops only
    meta = read_metadata(path)
    assert meta.quantization == "int8-dynamic" and meta.quantization_info.items() >= int8.INFO.items()
    assert meta.int8_weights == "uint8"
    assert set(int8.integer_matmul_weights(onnx.load(str(path))).values()) == {"uint8"}
    runner = OnnxRunner(path)
    assert runner.describe()["quantization"] == "int8-dynamic"
    x = inputs((1, 3, 128, 128))[0]
    class_logits, _ = runner.run(x)
    with torch.inference_mode():
        ref = tiny_model(torch.from_numpy(x)).class_logits
    assert 0 < rel_diff(class_logits, ref) <= 0.1


def test_int8_keeps_what_makes_the_masks_and_outputs_float(tiny_int8, tiny_model):
    """Mixed precision: the MatMuls of the pixel decoder (mask features), the mask head and the class head stay
    float32, the backbone's and the decoder layers' are int8, and the file says so. Tiny config: 2 encoder
    layers x 6 MatMuls, the mask head's 3 on each of the 2 masked-attention layers' queries (its first use, on
    the learned query features, is folded into a constant), the class head's 1."""
    from model_export.int8 import FLOAT_MODULES

    path, report = tiny_int8
    info = read_metadata(path).quantization_info
    cfg = tiny_model.config
    want = 6 * cfg.encoder_layers + 3 * cfg.decoder_layers + 1
    assert info["float_modules"] == list(FLOAT_MODULES) and info["float_matmuls"] == want
    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    float_left = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert len(float_left) == want and report.op_types["MatMulInteger"] > 0
    # The last MatMul before each output and mask product is float: class head, mask head.
    producer = {o: n for n in model.graph.node for o in n.output}
    class_head = producer["class_logits"]
    while class_head.op_type not in ("MatMul", "Gemm", "MatMulInteger"):
        class_head = producer[class_head.input[0]]
    assert class_head.op_type in ("MatMul", "Gemm")


def test_int8_rule_needs_module_records(tiny_export, tmp_path):
    """The rule reads the module each node was traced in; a graph without those records is refused rather
    than quantized whole."""
    from model_export.int8 import float_matmuls, node_modules, prepare

    path, _ = tiny_export
    source = onnx.load(str(path))
    assert any(m.startswith("model.pixel_decoder.") for m in node_modules(source).values())
    prepared = onnx.load(str(prepare(path, tmp_path / "prepared.onnx")))
    assert float_matmuls(prepared, source)
    for node in source.graph.node:
        del node.metadata_props[:]
    with pytest.raises(ValueError, match="module records"):
        float_matmuls(prepared, source)


def test_int8_products_are_exact_on_this_cpu(tiny_int8):
    """Every MatMulInteger of the int8 graph computes the exact integer product here: the file as stored
    (uint8 weights: exact on every CPU) and the graph as the runner runs it on this CPU (int8 weights where
    the CPU has VNNI). Before weights were stored as uint8, 5% of the entries came out saturated on x86 CPUs
    without VNNI (bench/int8_saturation.py)."""
    path, _ = tiny_int8
    runner = OnnxRunner(path)
    assert runner.int8_kernel == int8.cpu_int8_kernel() in ("vnni", "saturating", "exact")
    assert runner.int8_weights == {"vnni": "int8", "saturating": "uint8", "exact": "uint8"}[runner.int8_kernel]
    assert runner.describe()["int8_weights"] == runner.int8_weights
    x = {"pixel_values": inputs((1, 3, 128, 128))[0]}
    model = onnx.load(str(path))
    assert all(wrong == 0 for _, wrong, _, _ in int8.integer_matmul_errors(model, x))
    int8.store_weights(model, runner.int8_weights)
    rows = int8.integer_matmul_errors(model, x)
    assert len(rows) == sum(n.op_type == "MatMulInteger" for n in model.graph.node)
    assert all(wrong == 0 for _, wrong, _, _ in rows)


@pytest.mark.parametrize("kernel", ["saturating", "vnni"])
def test_runner_converts_int8_weights_for_the_cpu(tiny_int8, tmp_path, monkeypatch, kernel):
    """A file from before uint8 storage (int8 weights, no quantization_info) runs with uint8 weights on a CPU
    whose u8 x s8 kernel saturates, and a new file with int8 weights on a VNNI CPU: the same integers, so the
    outputs equal the file's own; the optimized-graph cache is keyed by the conversion."""
    path, _ = tiny_int8
    old = tmp_path / "old-int8.onnx"
    model = onnx.load(str(path))
    int8.store_weights(model, "int8")
    meta = read_metadata(path)
    write_metadata(model, ExportMetadata(**{**meta.__dict__, "quantization_info": {}}))
    onnx.save(model, str(old))
    assert read_metadata(old).int8_weights == "int8"
    monkeypatch.setattr("runtimes.onnx_runner.cpu_int8_kernel", lambda: kernel)
    want = {"saturating": "uint8", "vnni": "int8"}[kernel]
    x = inputs((1, 3, 128, 128))[0]
    reference = OnnxRunner(path, threads=1).run(x)  # as stored or converted: the same integer products
    for source in (old, path):
        runner = OnnxRunner(source, threads=1, cache_dir=tmp_path / "cache")
        assert runner.int8_weights == want and runner.int8_kernel == kernel
        converted = runner.metadata.int8_weights != want
        assert (f"-w{want}" in runner.cache_path.name) == converted and runner.cache_path.is_file()
        for got, ref in zip(runner.run(x), reference):
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_export_arguments_are_validated(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="both height and width"):
        export_onnx(tiny_model, tmp_path / "x.onnx", height=64)
    with pytest.raises(ValueError, match="exclude each other"):
        export_onnx(tiny_model, tmp_path / "x.onnx", height=64, width=64, dynamic_shape=True)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny_model, tmp_path / "x.onnx", opset=13)
    with pytest.raises(ValueError, match="quantize"):
        export_onnx(tiny_model, tmp_path / "x.onnx", quantize="int4")
    with pytest.raises(ValueError, match="float32 graphs"):
        export_onnx(tiny_model, tmp_path / "x.onnx", quantize="int8", fp16=True)
    assert issubclass(ExportCheckError, RuntimeError)


@pytest.fixture(scope="module")
def swin_tiny_folder(tmp_path_factory) -> Path:
    """The real swin-tiny COCO-panoptic architecture (133 classes, 100 queries), random weights."""
    return save_hf_checkpoint(architecture("tiny", "coco-panoptic"), tmp_path_factory.mktemp("swin-tiny"), seed=1)


def check_swin_tiny(folder: Path, report, path: Path) -> None:
    assert report.passed
    for c in report.checks:
        assert c.mask_flips == 0, c.describe()
        assert max(c.rel_diff.values()) <= REL_TOL
    assert report.output_shapes["class_logits"][1:] == (100, 134)
    assert report.op_types["Einsum"] == 10 and report.op_types["GridSample"] == 18  # 9 layers; 6 x 3 levels
    assert set(float_tensor_types(onnx.load(str(path))).values()) == {"float32"}
    meta = read_metadata(path)
    assert len(meta.config["id2label"]) == 133 and meta.source_sha256 == checkpoint_sha256(folder)[0]


@pytest.mark.slow
def test_swin_tiny_export(swin_tiny_folder, tmp_path):
    """Fixed shape (the dynamic-shape export of swin-tiny takes minutes: see the slow test below). Slow too: a
    minute on 2 cores, the longest test of the default run, which covers the exporter on the tiny Swin and R50
    configs (same code, fewer layers and channels) and swin-tiny's arithmetic by the PyTorch parity tests."""
    path = tmp_path / "swin-tiny.onnx"
    report = export_onnx(swin_tiny_folder, path, height=160, width=224, log=None)
    check_swin_tiny(swin_tiny_folder, report, path)
    assert report.input_shape == (1, 3, 160, 224)
    assert 150 * 2**20 < report.size_bytes < 250 * 2**20


@pytest.mark.slow
def test_swin_tiny_dynamic_export(swin_tiny_folder, tmp_path):
    path = tmp_path / "swin-tiny-dynamic.onnx"
    checks = [(1, 3, 96, 128), (3, 3, 64, 96)]
    report = export_onnx(swin_tiny_folder, path, dynamic_shape=True, dynamic_batch=True, check_shapes=checks, log=None)
    check_swin_tiny(swin_tiny_folder, report, path)
    assert report.input_shape == ("batch", 3, "height", "width")
    assert [c.input_shape for c in report.checks] == checks
