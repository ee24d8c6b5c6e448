"""ResNet backbones: parity with ``transformers`` (ResNetConfig backbone), loading, config, BN folding.

Parity follows ``tests/test_model_parity.py``: random weights (batch-norm statistics included) on
``transformers.Mask2FormerForUniversalSegmentation``, saved with ``save_pretrained`` and read back with
``load_model``; every compared tensor within 1e-4 of the reference relative to its largest magnitude.
The layouts are R50's and R101's block counts (3/4/6/3 and 3/4/23/3) with narrow stages and the tiny
decoder (hidden 64, 2 layers, 10 queries); the full-width R50 with the COCO-panoptic decoder is marked
slow.
"""

from __future__ import annotations

import json

import pytest
import torch

from mask2former import ResNetConfig, load_model, read_config
from mask2former.mask2former import Mask2Former
from mask2former.reference import (
    TINY_R50,
    TINY_R101,
    architecture,
    compare,
    compare_flip_free,
    compare_pixel_stages,
    hf_model,
)
from mask2former.resnet import FrozenBatchNorm2d, ResNetBackbone, fold_batch_norm
from mask2former.weights import CheckpointMismatch, convert_hf_state_dict, read_hf_state_dict, to_hf_state_dict
from pipeline.config import RESNET_DEPTHS, Mask2FormerConfig

pytest.importorskip("transformers")

ARCHS = {"tiny-r50": TINY_R50, "tiny-r101": TINY_R101, "r50-coco-panoptic": architecture("r50", "coco-panoptic")}
SIZE = (200, 168)  # neither side a multiple of 32: the stage maps are 50x42, 25x21, 13x11, 7x6
STEM = "model.pixel_level_module.encoder.embedder.embedder."
BLOCK = "model.pixel_level_module.encoder.encoder.stages.{}.layers.{}."


@pytest.fixture(
    scope="module", params=["tiny-r50", "tiny-r101", pytest.param("r50-coco-panoptic", marks=pytest.mark.slow)]
)
def case(request, tmp_path_factory):
    """(name, reference model, checkpoint folder, our model, input, reference outputs)."""
    arch = ARCHS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = hf_model(arch, seed=1)
    ref.save_pretrained(folder)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        r = ref(x, output_hidden_states=True, output_auxiliary_logits=True)
    return request.param, ref, folder, load_model(folder), x, r


def test_loads_as_resnet(case):
    name, ref, folder, ours, _, _ = case
    bb = ours.config.backbone
    assert isinstance(bb, ResNetConfig) and isinstance(ours.backbone, ResNetBackbone)
    assert list(bb.depths) == ref.config.backbone_config.depths
    assert bb.stage_channels == tuple(ref.config.backbone_config.hidden_sizes)
    keys = set(ours.state_dict())
    last = bb.depths[2] - 1  # res4's last block: 5 (R50) or 22 (R101)
    for key in (
        "backbone.stem.conv1.weight",
        "backbone.stem.conv1.norm.scale",
        "backbone.stem.conv1.norm.shift",
        "backbone.res2.0.shortcut.weight",
        "backbone.res2.0.shortcut.norm.scale",
        "backbone.res2.0.conv2.weight",
        "backbone.res3.0.shortcut.norm.shift",
        f"backbone.res4.{last}.conv3.norm.scale",
        "backbone.res5.2.conv1.weight",
    ):
        assert key in keys, key
    assert "backbone.res2.1.shortcut.weight" not in keys  # identity shortcut after the first block
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in keys)


def test_stage_by_stage_parity(case):
    name, ref, _, ours, x, r = case
    with torch.inference_mode():
        features = ours.backbone(x)
    for i, a in enumerate(features):
        assert a.shape[-2:] == (-(-SIZE[0] // 2 ** (i + 2)), -(-SIZE[1] // 2 ** (i + 2)))
    compare_pixel_stages(name, ours, x, r)


def test_end_to_end_parity(case):
    name, _, _, ours, x, r = case
    # The inputs are chosen so that no attention-mask entry sits within rounding of 0 (no "flip", see
    # tests/test_model_parity.py): then the whole model is compared.
    out, shares = compare_flip_free(name, ours, x, r)
    assert any(0.05 < s < 0.95 for s in shares), f"attended shares per layer {shares}: masking not exercised"
    assert out.mask_logits.shape == (2, ours.config.num_queries, 50, 42)


def test_to_hf_state_dict_keeps_the_function(case):
    """Our weights written back under HF keys (norms unfolded as weight=scale, bias=shift, mean 0, var 1-eps)
    give the reference model the same backbone outputs."""
    name, ref, _, ours, x, r = case
    hf_keys = list(ref.state_dict())
    back = to_hf_state_dict(ours.state_dict(), hf_keys)
    assert set(hf_keys) - set(back) == {k for k in hf_keys if k.endswith("num_batches_tracked")} | {
        "criterion.empty_weight"
    }
    again = type(ref)(ref.config).eval()
    missing, unexpected = again.load_state_dict(back, strict=False)
    assert not unexpected and all(k.endswith(("num_batches_tracked", "empty_weight")) for k in missing)
    with torch.inference_mode():
        hidden = again(x, output_hidden_states=True).encoder_hidden_states
    for i, (a, b) in enumerate(zip(hidden, r.encoder_hidden_states, strict=True)):
        compare(f"{name} round trip res{i + 2}", a, b)


def test_fold_batch_norm_matches_batch_norm():
    gen = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(6, generator=gen))
        bn.bias.copy_(torch.randn(6, generator=gen))
        bn.running_mean.copy_(torch.randn(6, generator=gen))
        bn.running_var.copy_(torch.rand(6, generator=gen) + 0.01)
    frozen = FrozenBatchNorm2d(6)
    scale, shift = fold_batch_norm(bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=bn.eps)
    frozen.load_state_dict({"scale": scale, "shift": shift})
    x = torch.randn(2, 6, 5, 7, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)
    assert scale.dtype == torch.float32


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r50-keys")
    ref = hf_model(TINY_R50, seed=2)
    ref.save_pretrained(folder)
    model = Mask2Former(read_config(folder))
    return folder, read_hf_state_dict(folder), {k: v.shape for k, v in model.state_dict().items()}


def test_num_batches_tracked_is_ignored(r50):
    _, state, expected = r50
    assert any(k.endswith("num_batches_tracked") for k in state)
    without = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    a, b = convert_hf_state_dict(state, expected), convert_hf_state_dict(without, expected)
    assert set(a) == set(b) == set(expected)


def test_missing_batch_norm_statistic_is_named(r50):
    _, state, expected = r50
    state = dict(state)
    del state[BLOCK.format(1, 0) + "layer.1.normalization.running_var"]
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(state, expected)
    assert e.value.missing == ["backbone.res3.0.conv2.norm.scale", "backbone.res3.0.conv2.norm.shift"]
    assert len(e.value.unused) == 3 and all("batch-norm siblings are missing" in k for k in e.value.unused)


def test_misshaped_batch_norm_is_named(r50):
    _, state, expected = r50
    state = dict(state)
    state[STEM + "normalization.running_mean"] = torch.zeros(1)  # would broadcast in the fold
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(state, expected)
    assert len(e.value.misshaped) == 1 and "backbone.stem.conv1.norm" in e.value.misshaped[0]
    state = dict(r50[1])
    state[BLOCK.format(3, 0) + "shortcut.convolution.weight"] = torch.zeros(128, 96, 3, 3)
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(state, expected)
    assert e.value.misshaped == [
        f"{BLOCK.format(3, 0)}shortcut.convolution.weight -> backbone.res5.0.shortcut.weight: "
        "checkpoint (128, 96, 3, 3), model (128, 96, 1, 1)"
    ]


def test_checkpoint_deeper_than_config_is_refused(r50):
    """An R101 checkpoint read with an R50 config (or the reverse) must not load partially."""
    _, _, expected = r50
    deeper = hf_model(TINY_R101, seed=2).state_dict()
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(deeper, expected)
    assert any("stages.2.layers.22." in k for k in e.value.unused) and not e.value.missing


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("downsample_in_bottleneck", True, "downsample_in_bottleneck=True"),
        ("downsample_in_first_stage", True, "downsample_in_first_stage=True"),
        ("layer_type", "basic", "layer_type 'basic'"),
        ("hidden_act", "gelu", "activation 'gelu'"),
        ("out_features", ["stage2", "stage3", "stage4"], "stage1..stage4"),
    ],
)
def test_unsupported_resnet_variants_are_refused(r50, tmp_path, field, value, message):
    folder = r50[0]
    d = json.loads((folder / "config.json").read_text())
    d["backbone_config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path)


def test_config_round_trip(r50):
    """Ours -> HF dict -> ``transformers`` config -> its dict -> ours gives the same config."""
    from transformers import Mask2FormerConfig as HFConfig

    cfg = read_config(r50[0])
    assert cfg.backbone == ResNetConfig(depths=(3, 4, 6, 3), hidden_sizes=(32, 64, 96, 128), embedding_size=16)
    d = cfg.to_hf_dict()
    assert d["backbone_config"]["model_type"] == "resnet"
    assert d["backbone_config"]["downsample_in_bottleneck"] is False
    assert Mask2FormerConfig.from_hf_dict(d).backbone == cfg.backbone
    through_hf = HFConfig.from_dict(d).to_dict()
    assert through_hf["backbone_config"]["model_type"] == "resnet"
    again = Mask2FormerConfig.from_hf_dict(through_hf)
    assert again.backbone == cfg.backbone and again.decoder_layers == cfg.decoder_layers
    assert again.id2label == cfg.id2label


def test_resnet_config():
    assert ResNetConfig.from_depth(101).depths == RESNET_DEPTHS[101] == (3, 4, 23, 3)
    r50 = ResNetConfig.from_depth(50)
    assert r50.stage_channels == (256, 512, 1024, 2048) and r50.bottleneck_channels == (64, 128, 256, 512)
    with pytest.raises(ValueError, match="depth 34"):
        ResNetConfig.from_depth(34)
    with pytest.raises(ValueError, match="4 stages"):
        ResNetConfig(depths=(3, 4, 6))


def test_any_input_size_gives_ceil_sized_maps():
    model = ResNetBackbone(ResNetConfig(depths=(1, 1, 1, 1), hidden_sizes=(8, 16, 24, 32), embedding_size=4)).eval()
    for h, w in [(33, 31), (64, 65), (1, 1)]:
        with torch.inference_mode():
            maps = model(torch.randn(1, 3, h, w))
        assert [m.shape[-2:] for m in maps] == [(-(-h // 2**i), -(-w // 2**i)) for i in (2, 3, 4, 5)]
        assert [m.shape[1] for m in maps] == [8, 16, 24, 32]
