"""``m2f export onnx --plugins``: TensorRT plugin nodes, checked without TensorRT.

The plugin graph (one ``MultiscaleDeformableAttnPlugin_TRT`` node per encoder layer, one ``m2f::MaskedAttention``
node per decoder layer) runs in ONNX Runtime with the custom nodes implemented on the CPU by our reference code
(onnxruntime-extensions Python ops, :mod:`model_export.plugins.ort_reference`) and is compared with the standard
graph's outputs on the same inputs: fixed 128x192 input, dynamic batch, at batch 1 and 3; max |diff| <=
1e-4 x max |standard|. The plugin's mask rule (logit >= 0) and the model's (sigmoid >= 0.5) differ only for
logits in [-1.8e-7, 0); the reference ops count such entries and the tests assert there were none, so the
outputs are compared whole.

The model is the tiny architecture (hidden 64, 2 encoder and 2 decoder layers, 10 queries) built in memory
with random weights. Nothing here needs TensorRT; there is no TensorRT plugin yet, so no test carries the
``tensorrt`` marker.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime_extensions")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import mask2former.masked_attention as masked_attention_module  # noqa: E402
import mask2former.pixel_decoder as pixel_decoder  # noqa: E402
from mask2former.mask2former import Mask2Former  # noqa: E402
from mask2former.masked_attention import SIGMOID_HALF_BAND_F32, masked_attention_reference  # noqa: E402
from model_export.graph import op_types  # noqa: E402
from model_export.onnx import export_onnx  # noqa: E402
from model_export.plugins import (  # noqa: E402
    MASKED_ATTENTION_DOMAIN,
    MASKED_ATTENTION_OP,
    MS_DEFORM_ATTN_DOMAIN,
    MS_DEFORM_ATTN_OP,
    PLUGIN_OPS,
    shapes,
)
from model_export.plugins.ops import masked_attention_logit_rule, ms_deform_attn_op, plugin_ops  # noqa: E402
from model_export.plugins.ort_reference import CONTRIB_DOMAIN, STATS, contrib_copy, reference_session  # noqa: E402
from model_format.metadata import INPUT_NAME, OUTPUT_NAMES  # noqa: E402
from pipeline.config import Mask2FormerConfig, SwinConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")

REL_TOL = 1e-4
HEIGHT, WIDTH = 128, 192
TINY = Mask2FormerConfig(
    backbone=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4),
    num_labels=5,
    num_queries=10,
    hidden_dim=64,
    feature_size=64,
    mask_feature_size=64,
    encoder_layers=2,
    encoder_feedforward_dim=128,
    decoder_layers=2,
    dim_feedforward=128,
    num_attention_heads=4,
)
MSDA = f"{MS_DEFORM_ATTN_DOMAIN}::{MS_DEFORM_ATTN_OP}"
MASKED = f"{MASKED_ATTENTION_DOMAIN}::{MASKED_ATTENTION_OP}"


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights ~ N(0, 1/fan_in), norms around one, embeddings N(0, 1); mask logits centred on 0 and widened so
    that masked attention blocks a real share of each query's pixels."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm | nn.GroupNorm) and name == "weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name in ("query_feat", "query_pos", "level_embed"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.pixel_decoder.mask_proj.bias.zero_()
    model.pixel_decoder.mask_proj.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def tiny_model() -> Mask2Former:
    return _randomize(Mask2Former(TINY), seed=3).eval()


@pytest.fixture(scope="module")
def plugin_export(tiny_model, tmp_path_factory):
    """Fixed 128x192, dynamic batch, with plugins; the exporter's own check runs at batch 1 and 3."""
    path = tmp_path_factory.mktemp("plugins") / "tiny-plugins.onnx"
    report = export_onnx(tiny_model, path, height=HEIGHT, width=WIDTH, dynamic_batch=True, plugins=True, log=None)
    return path, report


@pytest.fixture(scope="module")
def standard_export(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("standard") / "tiny.onnx"
    export_onnx(tiny_model, path, height=HEIGHT, width=WIDTH, dynamic_batch=True, check=False, log=None)
    return path


def _nodes(model: onnx.ModelProto, domain: str, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == domain and n.op_type == op]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of a graph constant (initializer or Constant node output)."""
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return onnx.numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


def _value_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """{tensor name: shape} from the exporter's value_info: dim_param names for symbolic axes, None if unknown."""

    def dim(d: onnx.TensorShapeProto.Dimension):
        return d.dim_param or (d.dim_value if d.HasField("dim_value") else None)

    infos = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    out = {vi.name: tuple(dim(d) for d in vi.type.tensor_type.shape.dim) for vi in infos}
    for t in model.graph.initializer:
        out[t.name] = tuple(t.dims)
    for n in model.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = tuple(n.attribute[0].t.dims)
    return out


# ---------------------------------------------------------------------------------------------- the graph
def test_plugin_graph_has_one_node_per_layer(plugin_export):
    path, report = plugin_export
    model = onnx.load(str(path))
    ops = op_types(model)
    assert ops[MSDA] == TINY.encoder_layers and ops[MASKED] == TINY.decoder_layers
    assert {op for op in ops if "::" in op} == set(PLUGIN_OPS), "no other custom ops"
    assert "GridSample" not in ops, "deformable attention is the plugin's, not GridSample"
    assert report.op_types == ops
    imports = {o.domain: o.version for o in model.opset_import}
    assert imports[MS_DEFORM_ATTN_DOMAIN] == 1 and imports[MASKED_ATTENTION_DOMAIN] == 1
    assert imports[""] == report.opset == 20


def test_plugin_node_attributes_and_inputs(plugin_export):
    model = onnx.load(str(plugin_export[0]))
    for node in _nodes(model, MS_DEFORM_ATTN_DOMAIN, MS_DEFORM_ATTN_OP):
        assert _attrs(node) == {"plugin_version": b"1", "plugin_namespace": b""}
        assert len(node.input) == 5 and len(node.output) == 1
        # TensorRT's contract: int32 (H_l, W_l) per level, coarse to fine (strides 32, 16, 8), and level starts.
        spatial_shapes = _constant(model, node.input[1])
        level_start_index = _constant(model, node.input[2])
        assert spatial_shapes.dtype == np.int32 and level_start_index.dtype == np.int32
        assert spatial_shapes.tolist() == [[HEIGHT // s, WIDTH // s] for s in (32, 16, 8)]
        assert level_start_index.tolist() == [0, 4 * 6, 4 * 6 + 8 * 12]
    d = TINY.hidden_dim // TINY.num_attention_heads
    for node in _nodes(model, MASKED_ATTENTION_DOMAIN, MASKED_ATTENTION_OP):
        attrs = _attrs(node)
        assert set(attrs) == {"scale", "plugin_version", "plugin_namespace"}
        assert attrs["scale"] == pytest.approx(1 / math.sqrt(d), rel=1e-7)
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"m2f"
        assert len(node.input) == 4 and len(node.output) == 1


def test_plugin_node_shapes_follow_shape_inference(plugin_export):
    """The exported nodes' input/output shapes (symbolic batch included) are what shapes.py infers."""
    model = onnx.load(str(plugin_export[0]))
    known = _value_shapes(model)
    for node in _nodes(model, MS_DEFORM_ATTN_DOMAIN, MS_DEFORM_ATTN_OP):
        inputs = [known[name] for name in node.input]
        out = shapes.ms_deform_attn_shape(*inputs)
        assert out == known[node.output[0]]
        heads = TINY.num_attention_heads
        assert out[0] == "batch" and out[2:] == (heads, TINY.feature_size // heads)
    for node in _nodes(model, MASKED_ATTENTION_DOMAIN, MASKED_ATTENTION_OP):
        inputs = [known[name] for name in node.input]
        assert shapes.masked_attention_shape(*inputs) == known[node.output[0]]
        assert known[node.input[3]][:2] == ("batch", TINY.num_queries)


# ---------------------------------------------------------------------------------------------- parity
def test_plugin_export_passes_its_check(plugin_export):
    _, report = plugin_export
    assert report.passed and report.checked
    assert [c.input_shape for c in report.checks] == [(1, 3, HEIGHT, WIDTH), (3, 3, HEIGHT, WIDTH)]
    for c in report.checks:
        assert c.mask_flips == 0, "the masks each plugin node used equal PyTorch's"
        assert set(c.max_abs_diff) == {"class_logits", "mask_logits"}
        assert max(c.rel_diff.values()) <= REL_TOL
    assert report.input_shape == ("batch", 3, HEIGHT, WIDTH)
    assert report.metadata.exporter["plugins"] == ", ".join(PLUGIN_OPS)


def test_plugin_graph_matches_standard_graph(plugin_export, standard_export):
    """ONNX Runtime with the reference ops on the plugin graph = ONNX Runtime on the standard graph."""
    plugin = reference_session(onnx.load(str(plugin_export[0])))
    standard = ort.InferenceSession(str(standard_export), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(7)
    for batch in (1, 3):
        x = torch.randn(batch, 3, HEIGHT, WIDTH, generator=gen).numpy()
        STATS.reset()
        got = plugin.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        assert STATS.calls == {MS_DEFORM_ATTN_OP: TINY.encoder_layers, MASKED_ATTENTION_OP: TINY.decoder_layers}
        assert STATS.rule_disagreements == 0, f"mask-rule flips (min |logit| {STATS.min_abs_logit:.1e})"
        want = standard.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        for name, a, b in zip(OUTPUT_NAMES, got, want):
            assert a.shape == b.shape
            rel = np.abs(a - b).max() / np.abs(b).max()
            assert rel <= REL_TOL, f"{name} at batch {batch}: rel diff {rel:.2e}"


def test_plugin_ops_in_pytorch_match_the_model(tiny_model):
    """Eager, under plugin_ops() the model runs the custom ops' CPU implementations: same outputs; and
    everything is restored afterwards."""
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_model(x)
        with plugin_ops(tiny_model):
            assert tiny_model.decoder.use_fused_attention
            got = tiny_model(x)
    torch.testing.assert_close(got.class_logits, want.class_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.mask_logits, want.mask_logits, rtol=0, atol=1e-4)
    assert not tiny_model.decoder.use_fused_attention and "use_fused_attention" not in vars(tiny_model.decoder)
    assert pixel_decoder.ms_deform_attn.__module__ == "mask2former.pixel_decoder"
    assert masked_attention_module.masked_attention.__module__ == "mask2former.masked_attention"


def test_standard_export_is_unaffected(standard_export, plugin_export):
    model = onnx.load(str(standard_export))
    ops = op_types(model)
    assert all("::" not in op for op in ops), "standard ONNX ops only"
    assert {"GridSample", "Or"} <= set(ops)
    assert not {o.domain for o in model.opset_import} & {MS_DEFORM_ATTN_DOMAIN, MASKED_ATTENTION_DOMAIN}


@pytest.mark.slow
def test_dynamic_shape_plugin_export(tiny_model, tmp_path):
    """Dynamic batch and size (~40 s on 2 cores): the level shapes and starts are computed from the input's
    shape in the graph (int32), and the export's check passes at 1x3x128x192 and 3x3x200x136."""
    path = tmp_path / "dynamic.onnx"
    report = export_onnx(tiny_model, path, dynamic_shape=True, dynamic_batch=True, plugins=True, log=None)
    assert report.passed and [c.input_shape for c in report.checks] == [(1, 3, 128, 192), (3, 3, 200, 136)]
    assert all(c.mask_flips == 0 and max(c.rel_diff.values()) <= REL_TOL for c in report.checks)
    model = onnx.load(str(path))
    known = _value_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    for node in _nodes(model, MS_DEFORM_ATTN_DOMAIN, MS_DEFORM_ATTN_OP):
        assert known[node.input[1]] == (3, 2) and known[node.input[2]] == (3,)
        assert types[node.input[1]] == types[node.input[2]] == onnx.TensorProto.INT32
        assert known[node.output[0]][0] == "batch"


# ---------------------------------------------------------------------------------------------- reference ops
def test_contrib_copy_moves_only_the_plugin_nodes(plugin_export):
    model = onnx.load(str(plugin_export[0]))
    before = model.SerializeToString()
    copy = contrib_copy(model)
    assert model.SerializeToString() == before, "the original graph is not touched"
    moved = {n.op_type for n in copy.graph.node if n.domain == CONTRIB_DOMAIN}
    assert moved == {MS_DEFORM_ATTN_OP, MASKED_ATTENTION_OP}
    assert not [n for n in copy.graph.node if n.domain in (MS_DEFORM_ATTN_DOMAIN, MASKED_ATTENTION_DOMAIN)]
    domains = {o.domain for o in copy.opset_import}
    assert CONTRIB_DOMAIN in domains and not domains & {MS_DEFORM_ATTN_DOMAIN, MASKED_ATTENTION_DOMAIN}
    assert [n.attribute for n in copy.graph.node] == [n.attribute for n in model.graph.node]


def test_logit_rule_is_the_reference_outside_the_sigmoid_band():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=gen)  # (B, H, Q, d)
    k, v = (torch.randn(2, 4, 7, 16, generator=gen) for _ in range(2))  # (B, H, S, d)
    logits = torch.randn(2, 5, 7, generator=gen)  # (B, Q, S)
    logits[0, 1] = -1.0  # a row blocked everywhere attends everywhere
    logits[logits.abs() < 1e-3] = 0.5
    torch.testing.assert_close(
        masked_attention_logit_rule(q, k, v, logits), masked_attention_reference(q, k, v, logits), rtol=0, atol=0
    )
    # In the band the sigmoid rounds to 0.5: the model attends, the plugin blocks.
    logits[1, 2, :] = 1.0
    logits[1, 2, 3] = -SIGMOID_HALF_BAND_F32
    differ = masked_attention_logit_rule(q, k, v, logits) != masked_attention_reference(q, k, v, logits)
    assert differ[1, :, 2].any() and not differ[0].any()


def test_ms_deform_attn_op_checks_level_starts():
    value = torch.randn(1, 4 + 1, 2, 16)
    locations = torch.rand(1, 3, 2, 2, 4, 2)
    weights = torch.rand(1, 3, 2, 2, 4)
    shapes_ = torch.tensor([[2, 2], [1, 1]], dtype=torch.int32)
    out = ms_deform_attn_op(value, shapes_, torch.tensor([0, 4], dtype=torch.int32), locations, weights)
    assert out.shape == (1, 3, 2, 16)
    ref = pixel_decoder.ms_deform_attn(value, [(2, 2), (1, 1)], locations, weights)  # (N, Lq, M*D)
    torch.testing.assert_close(out.flatten(2), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn_op(value, shapes_, torch.tensor([0, 3], dtype=torch.int32), locations, weights)


# ---------------------------------------------------------------------------------------------- shape inference
def test_ms_deform_attn_shape_known_and_symbolic():
    assert shapes.ms_deform_attn_shape((2, 120, 8, 32), (3, 2), (3,), (2, 120, 8, 3, 4, 2), (2, 120, 8, 3, 4)) == (
        2, 120, 8, 32,
    )  # fmt: skip
    # Symbols and unknowns pass through; the query count comes from sampling_locations.
    out = shapes.ms_deform_attn_shape(("B", "S", 8, 32), (3, 2), (-1,), ("B", "Lq", 8, 3, 4, 2), (None, "Lq", 8, 3, 4))
    assert out == ("B", "Lq", 8, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (((2, 120, 8), (3, 2), (3,), (2, 120, 8, 3, 4, 2), (2, 120, 8, 3, 4)), "value must have rank 4"),
        (((2, 120, 8, 32), (3, 2), (3,), (2, 120, 4, 3, 4, 2), (2, 120, 8, 3, 4)), "heads M"),
        (((2, 120, 8, 32), (3, 2), (2,), (2, 120, 8, 3, 4, 2), (2, 120, 8, 3, 4)), "levels L"),
        (((2, 120, 8, 32), (3, 2), (3,), (2, 120, 8, 3, 4, 2), (2, 120, 8, 3, 2)), "points P"),
        (((2, 120, 8, 32), (3, 2), (3,), (2, 120, 8, 3, 4, 2), (1, 120, 8, 3, 4)), "batch N"),
        (((2, 120, 8, 32), (3, 2), (3,), (2, 100, 8, 3, 4, 2), (2, 120, 8, 3, 4)), "queries Lq"),
        (((2, 120, 8, 32), (3, 3), (3,), (2, 120, 8, 3, 4, 2), (2, 120, 8, 3, 4)), r"spatial_shapes\[1\] must be 2"),
        (((2, 120, 8, 32), (3, 2), (3,), (2, 120, 8, 3, 4, 3), (2, 120, 8, 3, 4)), "sampling_locations"),
        (((2, -5, 8, 32), (3, 2), (3,), (2, 120, 8, 3, 4, 2), (2, 120, 8, 3, 4)), "negative dimension"),
    ],
)
def test_ms_deform_attn_shape_errors(args, message):
    with pytest.raises(shapes.PluginShapeError, match=message):
        shapes.ms_deform_attn_shape(*args)


def test_ms_deform_attn_dtypes():
    assert shapes.ms_deform_attn_dtype("float32", "int32", "int32", "float32", "float32") == "float32"
    assert shapes.ms_deform_attn_dtype("DataType.HALF", "DataType.INT32", "int32", "half", "fp16") == "float16"
    with pytest.raises(shapes.PluginShapeError, match="spatial_shapes must be int32"):
        shapes.ms_deform_attn_dtype("float32", "int64", "int32", "float32", "float32")
    with pytest.raises(shapes.PluginShapeError, match="attention_weights must have value's dtype"):
        shapes.ms_deform_attn_dtype("float32", "int32", "int32", "float32", "float16")
    with pytest.raises(shapes.PluginShapeError, match="value must be one of"):
        shapes.ms_deform_attn_dtype("bfloat16", "int32", "int32", "bfloat16", "bfloat16")
    assert shapes.ms_deform_attn_supports(["float16", "int32", "int32", "float16", "float16", "float16"])
    assert not shapes.ms_deform_attn_supports(["float16", "int32", "int32", "float16", "float16", "float32"])
    assert not shapes.ms_deform_attn_supports(["float32", "int32"])


def test_masked_attention_shape():
    assert shapes.masked_attention_shape((2, 8, 100, 32), (2, 8, 475, 32), (2, 8, 475, 32), (2, 100, 475)) == (
        2, 8, 100, 32,
    )  # fmt: skip
    out = shapes.masked_attention_shape(("B", 8, 100, 32), ("B", 8, "S", 32), (-1, 8, "S", 32), ("B", 100, None))
    assert out == ("B", 8, 100, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (((2, 8, 100, 32), (2, 8, 475, 32), (2, 8, 475, 32), (2, 100, 475, 1)), "mask_logits must have rank 3"),
        (((2, 8, 100, 32), (2, 8, 475, 32), (2, 8, 475, 32), (2, 99, 475)), "queries Q"),
        (((2, 8, 100, 32), (2, 8, 475, 32), (2, 8, 474, 32), (2, 100, 475)), "keys S"),
        (((2, 8, 100, 32), (2, 4, 475, 32), (2, 8, 475, 32), (2, 100, 475)), "heads H"),
        (((2, 8, 100, 32), (2, 8, 475, 32), (2, 8, 475, 32), (3, 100, 475)), "batch B"),
        (((2, 8, 100, 32), (2, 8, 475, 64), (2, 8, 475, 32), (2, 100, 475)), "head size d"),
        (((2, 8, 100, 48), (2, 8, 475, 48), (2, 8, 475, 48), (2, 100, 475)), "not one of"),
        (((2, 8, 100, 32), (2, 8, 0, 32), (2, 8, 0, 32), (2, 100, 0)), "no keys"),
    ],
)
def test_masked_attention_shape_errors(args, message):
    with pytest.raises(shapes.PluginShapeError, match=message):
        shapes.masked_attention_shape(*args)


def test_masked_attention_dtypes():
    assert shapes.masked_attention_dtype("float16", "float16", "float16", "float32") == "float16"
    assert shapes.masked_attention_dtype(np.float32, "float", "tensor(float)", torch.float16) == "float32"
    with pytest.raises(shapes.PluginShapeError, match="share one dtype"):
        shapes.masked_attention_dtype("float16", "float32", "float16", "float16")
    with pytest.raises(shapes.PluginShapeError, match="mask_logits must be"):
        shapes.masked_attention_dtype("float32", "float32", "float32", "int64")
    assert shapes.masked_attention_supports(["float32", "float32", "float32", "float16", "float32"])
    assert not shapes.masked_attention_supports(["float32", "float32", "float32", "float16", "float16"])


def test_shapes_module_stays_in_step_with_the_kernel():
    assert shapes.SUPPORTED_HEAD_DIMS == masked_attention_module.SUPPORTED_HEAD_DIMS


# ---------------------------------------------------------------------------------------------- CLI and options
def test_cli_plugins_flag(monkeypatch, tmp_path, capsys):
    import model_export.onnx
    from m2f.cli import main

    seen = []

    class Report:
        def summary(self) -> str:
            return "summary"

    def fake_export(weights, output, **kw):
        seen.append(kw)
        return Report()

    monkeypatch.setattr(model_export.onnx, "export_onnx", fake_export)
    args = ["export", "onnx", "--weights", str(tmp_path), "-o", str(tmp_path / "m.onnx"), "--dynamic-batch"]
    assert main([*args, "--plugins"]) == 0
    assert main(args) == 0
    assert [kw["plugins"] for kw in seen] == [True, False]
    assert capsys.readouterr().out == "summary\nsummary\n"


def test_plugin_export_options_are_checked_before_tracing(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="plugin graphs are float32"):
        export_onnx(tiny_model, tmp_path / "x.onnx", height=64, width=64, fp16=True, plugins=True, log=None)
    with pytest.raises(ValueError, match="plugin graphs are float32"):
        export_onnx(tiny_model, tmp_path / "x.onnx", height=64, width=64, quantize="int8", plugins=True, log=None)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "extensions" in name else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match="pip install onnxruntime-extensions"):
        export_onnx(tiny_model, tmp_path / "x.onnx", height=64, width=64, plugins=True, log=None)
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_runtime_runner_refuses_plugin_graphs(plugin_export):
    from runtimes.onnx_runner import OnnxRunner

    path, _ = plugin_export
    with pytest.raises(ValueError, match="TensorRT plugin nodes"):
        OnnxRunner(path)
