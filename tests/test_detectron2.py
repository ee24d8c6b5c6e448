"""detectron2 checkpoints: safe reading, architecture from the tensors, key mapping, labels, ``m2f convert``.

The d2 files are written here from a ``transformers`` reference model with random weights (batch-norm
statistics included) by the inverse of our mapping (:func:`hf_to_d2`, written independently of
:mod:`mask2former.detectron2`): ``model_final.pth`` and model-zoo ``.pkl`` files, Swin and ResNet, FrozenBN and
SyncBN. Loaded back, the model is compared with the reference stage by stage and end to end (1e-4 relative,
as in tests/test_resnet.py and tests/test_model_parity.py, with the same flip-free seeds and sizes), and with
the same reference loaded from its HF folder (bit for bit).
"""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch

from m2f.cli import main
from mask2former import load_model
from mask2former.detectron2 import (
    CheckpointReadError,
    UnsafeCheckpointError,
    infer_config,
    match_d2_key,
    read_detectron2_file,
)
from mask2former.reference import TINY, TINY_R50, compare_flip_free, compare_pixel_stages, hf_model
from mask2former.swin import relative_position_index
from mask2former.weights import CheckpointMismatch, match_hf_key
from pipeline.config import ResNetConfig, SwinConfig
from pipeline.label_sets import LABEL_SETS, read_labels_json

pytest.importorskip("transformers")

REL_TOL = 1e-4
# Reference seeds and input sizes whose attention masks have no entry within rounding of 0 (see
# tests/test_model_parity.py): the whole model is compared.
ARCHS = {"swin": (TINY, (200, 200)), "r50": (TINY_R50, (200, 168))}

# ---------------------------------------------------------------------------------------------- the inverse
PD, PR = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
# Our key -> detectron2's (first match wins); ResNet and most of Swin keep their names.
OURS_TO_D2 = [
    (r"^backbone\.stages\.(\d+)\.", r"backbone.layers.\1."),
    (r"^backbone\.out_norms\.(\d)\.", r"backbone.norm\1."),
    (r"^backbone\.", r"backbone."),
    (r"^pixel_decoder\.level_embed$", PD + "transformer.level_embed"),
    (r"^pixel_decoder\.input_proj\.", PD + "input_proj."),
    (r"^pixel_decoder\.encoder\.(\d+)\.fc([12])\.", PD + r"transformer.encoder.layers.\1.linear\2."),
    (r"^pixel_decoder\.encoder\.(\d+)\.", PD + r"transformer.encoder.layers.\1."),
    (r"^pixel_decoder\.mask_proj\.", PD + "mask_features."),
    (r"^pixel_decoder\.lateral\.0\.", PD + "adapter_1."),
    (r"^pixel_decoder\.lateral\.1\.", PD + "adapter_1.norm."),
    (r"^pixel_decoder\.output\.0\.", PD + "layer_1."),
    (r"^pixel_decoder\.output\.1\.", PD + "layer_1.norm."),
    (r"^decoder\.query_pos$", PR + "query_embed.weight"),
    (r"^decoder\.query_feat$", PR + "query_feat.weight"),
    (r"^decoder\.level_embed$", PR + "level_embed.weight"),
    (r"^decoder\.input_proj\.", PR + "input_proj."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", PR + r"transformer_cross_attention_layers.\1.multihead_attn."),
    (r"^decoder\.layers\.(\d+)\.norm_cross\.", PR + r"transformer_cross_attention_layers.\1.norm."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.", PR + r"transformer_self_attention_layers.\1.self_attn."),
    (r"^decoder\.layers\.(\d+)\.norm_self\.", PR + r"transformer_self_attention_layers.\1.norm."),
    (r"^decoder\.layers\.(\d+)\.fc([12])\.", PR + r"transformer_ffn_layers.\1.linear\2."),
    (r"^decoder\.layers\.(\d+)\.norm_ffn\.", PR + r"transformer_ffn_layers.\1.norm."),
    (r"^decoder\.norm\.", PR + "decoder_norm."),
    (r"^decoder\.class_head\.", PR + "class_embed."),
    (r"^decoder\.mask_head\.", PR + "mask_embed."),
]


def ours_to_d2(key: str) -> str:
    for pattern, repl in OURS_TO_D2:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    raise KeyError(key)


def hf_to_d2(hf: dict[str, torch.Tensor], sync_bn: bool = False) -> dict[str, torch.Tensor]:
    """A detectron2 state dict with the tensors of an HF one: batch norms with their four statistics (plus
    ``num_batches_tracked`` for SyncBN), fused q/k/v, Swin's index buffers, the loss's class weights."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in hf.items():
        target = match_hf_key(key)
        if target is None:
            continue
        ours, part = target
        if part in ("q", "k", "v"):
            fused.setdefault(ours_to_d2(ours), {})[part] = tensor
        elif part is not None:  # batch-norm statistic of our norm module `ours`
            out[f"{ours_to_d2(ours)}.{part}"] = tensor.clone()
            if sync_bn and part == "weight":
                out[f"{ours_to_d2(ours)}.num_batches_tracked"] = torch.tensor(90000)
        else:
            out[ours_to_d2(ours)] = tensor.clone()
    for key, parts in fused.items():
        out[key] = torch.cat([parts[p] for p in "qkv"])
    for key in [k for k in out if k.endswith("attn.relative_position_bias_table")]:
        window = (round(out[key].shape[0] ** 0.5) + 1) // 2
        out[key.replace("bias_table", "index")] = relative_position_index(window)
    num_classes = out[PR + "class_embed.bias"].shape[0]
    out["criterion.empty_weight"] = torch.cat([torch.ones(num_classes - 1), torch.tensor([0.1])])
    return out


def save_pth(state: dict[str, torch.Tensor], path, old: bool = False, ddp: bool = False, legacy: bool = False):
    """``model_final.pth``; ``old``: with optimizer/scheduler; ``ddp``: ``module.`` keys; ``legacy``: torch's
    pre-zip serialization."""
    model = {f"module.{k}" if ddp else k: v for k, v in state.items()}
    extra = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 5}} if old else {}
    checkpoint = {"model": model, "trainer": {"iteration": 89999, "hooks": {}}, "iteration": 89999, **extra}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


def save_pkl(state: dict[str, torch.Tensor], path, protocol: int = 2, numpy1: bool = False):
    """A model-zoo ``.pkl``: numpy arrays, latin1-compatible; ``numpy1`` writes numpy 1.x's module names."""
    payload = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test", "matching_heuristics": True}
    data = pickle.dumps(payload, protocol=protocol)
    if numpy1:
        assert protocol < 4  # names as text lines (GLOBAL), so that a byte replacement keeps the pickle valid
        data = data.replace(b"numpy._core.", b"numpy.core.")
        assert b"numpy._core" not in data and b"numpy.core.multiarray" in data
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    """(name, reference, its HF folder, its d2 state dict, input, reference outputs)."""
    hparams, size = ARCHS[request.param]
    ref = hf_model(hparams, seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        r = ref(x, output_hidden_states=True, output_auxiliary_logits=True)
    return request.param, ref, folder, hf_to_d2(ref.state_dict()), x, r


# (file name, writer) per variant; ResNet also in SyncBN form (num_batches_tracked), DDP prefix, old keys.
VARIANTS = {
    "model_final.pth": lambda s, p: save_pth(s, p),
    "zoo.pkl": lambda s, p: save_pkl(s, p),
    "zoo-numpy1.pkl": lambda s, p: save_pkl(s, p, numpy1=True),
    "zoo-protocol5.pkl": lambda s, p: save_pkl(s, p, protocol=5),
    "syncbn-ddp-old.pth": lambda s, p: save_pth(s, p, old=True, ddp=True),
    "legacy-serialization.pth": lambda s, p: save_pth(s, p, legacy=True),
}


# Parity runs on one file per format and norm; the other pickle encodings give the same weights bit for bit
# (test_weights_equal_the_hf_checkpoints), so they are not run through the model again.
PARITY_VARIANTS = ["model_final.pth", "zoo.pkl", "syncbn-ddp-old.pth"]


def load_variant(variant: str, arch, tmp_path_factory):
    """(arch..., the d2 file, our model loaded from it)."""
    name, ref, folder, d2, x, r = arch
    if variant.startswith("syncbn"):
        if name != "r50":
            pytest.skip("Swin has no batch norms")
        d2 = hf_to_d2(ref.state_dict(), sync_bn=True)
    path = VARIANTS[variant](d2, tmp_path_factory.mktemp("d2") / variant)
    return name, ref, folder, d2, x, r, path, load_model(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def loaded(request, arch, tmp_path_factory):
    return load_variant(request.param, arch, tmp_path_factory)


@pytest.fixture(scope="module", params=PARITY_VARIANTS)
def parity(request, arch, tmp_path_factory):
    return load_variant(request.param, arch, tmp_path_factory)


# ---------------------------------------------------------------------------------------------- loading
def test_d2_state_dict_looks_like_detectron2(arch):
    name, _, _, d2, _, _ = arch
    keys = set(d2)
    assert "criterion.empty_weight" in keys
    assert {PD + "input_proj.0.0.weight", PD + "adapter_1.weight", PD + "adapter_1.norm.bias"} <= keys
    assert {
        PD + "layer_1.weight",
        PD + "mask_features.bias",
        PD + "transformer.encoder.layers.1.linear2.weight",
    } <= keys
    assert PD + "adapter_1.bias" not in keys and PD + "layer_1.bias" not in keys
    assert {PR + "transformer_self_attention_layers.1.self_attn.in_proj_weight", PR + "query_embed.weight"} <= keys
    assert {
        PR + "transformer_cross_attention_layers.0.multihead_attn.in_proj_bias",
        PR + "mask_embed.layers.2.bias",
    } <= keys
    if name == "swin":
        assert {"backbone.layers.0.blocks.0.attn.qkv.weight", "backbone.norm3.weight"} <= keys
        assert {
            "backbone.layers.2.blocks.1.attn.relative_position_index",
            "backbone.layers.1.downsample.reduction.weight",
        } <= keys
    else:
        assert {"backbone.stem.conv1.norm.running_var", "backbone.res5.0.shortcut.norm.running_mean"} <= keys
        assert "backbone.res4.5.conv3.weight" in keys and "backbone.res4.6.conv3.weight" not in keys
        assert not any(k.endswith("num_batches_tracked") for k in keys)  # FrozenBN: 4 buffers
        stats = d2["backbone.res3.0.conv2.norm.running_var"]
        assert stats.std() > 0.1 and not torch.allclose(stats, torch.ones_like(stats))  # random, not 0/1


def test_weights_equal_the_hf_checkpoints(loaded):
    """The d2 file gives bit for bit the weights that the same reference's HF folder gives."""
    _, _, folder, _, _, _, _, ours = loaded
    hf = load_model(folder).state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(hf)
    assert all(torch.equal(mine[k], hf[k]) for k in hf), [k for k in hf if not torch.equal(mine[k], hf[k])][:5]


def test_architecture_from_the_tensors(loaded):
    name, _, folder, _, _, _, path, ours = loaded
    from mask2former import read_config

    want, got = read_config(folder), ours.config
    assert type(got.backbone) is (SwinConfig if name == "swin" else ResNetConfig)
    assert got.backbone == want.backbone
    for field in ("num_labels", "num_queries", "hidden_dim", "feature_size", "mask_feature_size", "encoder_layers"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("encoder_feedforward_dim", "decoder_layers", "num_attention_heads", "dim_feedforward"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.preprocess.mean == (123.675, 116.28, 103.53) and got.preprocess.std == (58.395, 57.12, 57.375)
    assert got.labels == [f"LABEL_{i}" for i in range(5)] and not got.thing_ids  # no label set has 5 classes


def test_stage_by_stage_parity(parity):
    name, _, _, _, x, r, path, ours = parity
    compare_pixel_stages(f"{name} {path.name}", ours, x, r)


def test_end_to_end_parity(parity):
    name, _, _, _, x, r, path, ours = parity
    compare_flip_free(name, ours, x, r)


def test_every_d2_key_has_a_rule(arch):
    _, _, _, d2, _, _ = arch
    for key in d2:
        target = match_d2_key(key)
        assert target is None or isinstance(target, str | list), key
    assert match_d2_key("criterion.empty_weight") is None
    assert match_d2_key("backbone.layers.0.blocks.1.attn.relative_position_index") is None
    assert match_d2_key(PD + "input_proj.0.1.bias") == "model.pixel_level_module.decoder.input_projections.0.1.bias"
    assert match_d2_key(PR + "transformer_self_attention_layers.3.self_attn.in_proj_bias") == [
        f"model.transformer_module.decoder.layers.3.self_attn.{p}_proj.bias" for p in "qkv"
    ]
    with pytest.raises(KeyError):
        match_d2_key("sem_seg_head.predictor.something_new.weight")


def test_r101_depth_is_read_from_the_blocks(arch, tmp_path):
    """res4 with 23 blocks (R101): made from the tiny R50 by repeating its last res4 block."""
    name, _, _, d2, _, _ = arch
    if name != "r50":
        pytest.skip("ResNet only")
    deeper = dict(d2)
    for b in range(6, 23):
        deeper.update(
            {k.replace("res4.5.", f"res4.{b}."): v for k, v in d2.items() if k.startswith("backbone.res4.5.")}
        )
    cfg = infer_config(deeper)
    assert cfg.backbone.depths == (3, 4, 23, 3) and cfg.backbone.hidden_sizes == (32, 64, 96, 128)
    model = load_model(save_pkl(deeper, tmp_path / "r101.pkl"))
    assert len(model.backbone.res4) == 23


# ---------------------------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def swin_ref():
    return hf_model(TINY, seed=4)


@pytest.fixture(scope="module")
def swin_d2(swin_ref):
    return hf_to_d2(swin_ref.state_dict())


class WritesAFile:
    """A pickle payload that creates ``path`` when unpickled by plain ``pickle.load``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys, suffix):
    target = tmp_path / "pwned.txt"
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"model": {"x": WritesAFile(target)}}, protocol=2))
        with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle global \w+\.open"):
            read_detectron2_file(path)
    else:
        torch.save({"model": {"x": WritesAFile(target)}}, path)
        with pytest.raises(CheckpointReadError, match="Unsupported global"):
            read_detectron2_file(path)
    err = one_line_error(capsys, ["convert", str(path), "--output", str(tmp_path / "out")])
    assert ("refusing to unpickle global" if suffix == ".pkl" else "Unsupported global") in err
    assert not target.exists() and not (tmp_path / "out").exists()
    if suffix == ".pkl":  # the payload is real: plain pickle creates the file
        pickle.loads(path.read_bytes())["model"]["x"].close()
        assert target.exists()


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"m2f {argv[0]}: error: "), err
    return err


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_truncated_file_gives_one_line(swin_d2, tmp_path, capsys, suffix):
    whole = (save_pkl if suffix == ".pkl" else save_pth)(swin_d2, tmp_path / f"whole{suffix}")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointReadError) as e:
        load_model(cut)
    assert "\n" not in str(e.value) and "cannot read" in str(e.value)
    err = one_line_error(capsys, ["convert", str(cut), "--output", str(tmp_path / "out")])
    assert "cannot read" in err and not (tmp_path / "out").exists()


def test_renamed_key_gives_one_line_with_both_names(swin_d2, tmp_path, capsys):
    state = dict(swin_d2)
    old = PD + "transformer.encoder.layers.1.norm1.weight"
    state[old.replace("norm1", "norm_1")] = state.pop(old)
    path = save_pkl(state, tmp_path / "renamed.pkl")
    with pytest.raises(CheckpointMismatch) as e:
        load_model(path)
    assert e.value.missing == ["pixel_decoder.encoder.1.norm1.weight"]
    assert e.value.unused == [old.replace("norm1", "norm_1")]
    assert "\n" not in str(e.value)
    err = one_line_error(capsys, ["convert", str(path), "--output", str(tmp_path / "out")])
    assert "norm_1" in err and "pixel_decoder.encoder.1.norm1.weight" in err


def test_misshaped_key_is_named_in_detectron2_terms(swin_d2, tmp_path):
    state = dict(swin_d2)
    key = PR + "transformer_ffn_layers.0.linear1.bias"
    state[key] = torch.zeros(7)
    with pytest.raises(CheckpointMismatch) as e:
        load_model(save_pth(state, tmp_path / "bad.pth"))
    assert len(e.value.misshaped) == 1 and e.value.misshaped[0].startswith(key + " -> decoder.layers.0.fc1.bias")


def test_missing_architecture_key_gives_one_line(swin_d2, tmp_path):
    state = {k: v for k, v in swin_d2.items() if not k.startswith(PR + "class_embed")}
    with pytest.raises(CheckpointReadError, match="no sem_seg_head.predictor.class_embed.weight"):
        load_model(save_pkl(state, tmp_path / "x.pkl"))
    with pytest.raises(CheckpointReadError, match="holds no state dict"):
        read_detectron2_file(save_pth({}, tmp_path / "empty.pth"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_model(tmp_path / "missing.pkl")


def test_labels_of_another_class_count_give_one_line(swin_d2, tmp_path, capsys):
    path = save_pkl(swin_d2, tmp_path / "five.pkl")
    with pytest.raises(ValueError, match="the checkpoint has 5 classes but labels 'coco-panoptic' has 133"):
        load_model(path, labels="coco-panoptic")
    err = one_line_error(capsys, ["convert", str(path), "-o", str(tmp_path / "out"), "--labels", "ade20k-semantic"])
    assert "has 5 classes but labels 'ade20k-semantic' has 150" in err
    one_line_error(capsys, ["convert", str(path), "-o", str(tmp_path / "out"), "--labels", "no-such-set"])


# ---------------------------------------------------------------------------------------------- convert
def test_convert_writes_an_hf_folder(swin_ref, swin_d2, tmp_path, capsys):
    """``m2f convert`` with a user's labels: the folder loads in ours and in ``transformers`` to the model the
    d2 file came from."""
    from transformers import Mask2FormerForUniversalSegmentation

    src = save_pkl(swin_d2, tmp_path / "model_final.pkl")
    labels = tmp_path / "shapes.json"
    names = ["sky", "road", "car", "dog", "tree"]
    labels.write_text(json.dumps({"labels": names, "thing_ids": [2, 3], "shortest_edge": 96}))
    out = tmp_path / "converted"
    assert main(["convert", str(src), "--output", str(out), "--labels", str(labels)]) == 0
    assert "5 classes (2 things)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["thing_ids"] == [2, 3] and config["id2label"]["3"] == "dog"
    direct, converted = load_model(src, labels=labels), load_model(out)
    assert converted.config.labels == names and converted.config.thing_ids == {2, 3}
    assert converted.config.preprocess.shortest_edge == 96 and converted.config.preprocess.longest_edge == 1333
    assert converted.config.preprocess.mean == pytest.approx(direct.config.preprocess.mean)
    a, b = direct.state_dict(), converted.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    hf = Mask2FormerForUniversalSegmentation.from_pretrained(out).eval()
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = hf(x), swin_ref(x)
    torch.testing.assert_close(got.masks_queries_logits, want.masks_queries_logits, rtol=0, atol=0)
    torch.testing.assert_close(got.class_queries_logits, want.class_queries_logits, rtol=0, atol=0)


def test_predict_takes_a_d2_file(swin_d2, tmp_path, capsys):
    from PIL import Image

    src = save_pth(swin_d2, tmp_path / "model_final.pth")
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(image)
    assert main(["predict", str(image), "--weights", str(src), "--task", "semantic", "--shortest-edge", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "semantic" and result["segments"]


# ---------------------------------------------------------------------------------------------- label sets
COUNTS = {
    "coco-panoptic": (133, 80),
    "coco-instance": (80, 80),
    "ade20k-semantic": (150, 0),
    "ade20k-semantic-640": (150, 0),
    "ade20k-panoptic": (150, 100),
    "ade20k-instance": (100, 100),
    "cityscapes-semantic": (19, 0),
    "cityscapes-panoptic": (19, 8),
    "cityscapes-instance": (8, 8),
    "mapillary-vistas-semantic": (65, 0),
    "mapillary-vistas-panoptic": (65, 37),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_label_set_counts(name):
    s = LABEL_SETS[name]
    assert (len(s.labels), len(s.thing_ids)) == COUNTS[name]
    assert len(set(s.labels)) == len(s.labels)


def test_label_set_contents():
    coco = LABEL_SETS["coco-panoptic"]
    assert coco.thing_ids == frozenset(range(80)) and coco.labels[80] == "banner" and coco.labels[-1] == "rug-merged"
    ade = LABEL_SETS["ade20k-panoptic"]
    assert ade.labels[:3] == ("wall", "building", "sky") and ade.labels[-1] == "flag"
    assert [ade.labels[i] for i in sorted(ade.thing_ids)] == list(LABEL_SETS["ade20k-instance"].labels)
    assert 12 in ade.thing_ids and 0 not in ade.thing_ids  # person is a thing, wall stuff
    city = LABEL_SETS["cityscapes-panoptic"]
    assert city.thing_ids == frozenset(range(11, 19)) and city.labels[11] == "person"
    # The official configs' test sizes and OBJECT_MASK_THRESHOLD (configs/<dataset>/<task>-segmentation/).
    official = {
        "coco-panoptic": (800, 1333, 0.8),
        "coco-instance": (800, 1333, 0.8),
        "ade20k-semantic": (512, 2048, 0.8),
        "ade20k-semantic-640": (640, 2560, 0.8),  # the *_res640 configs (Swin-B, Swin-L)
        "ade20k-panoptic": (640, 2560, 0.8),
        "ade20k-instance": (640, 2560, 0.8),
        "cityscapes-semantic": (1024, 2048, 0.8),
        "cityscapes-panoptic": (1024, 2048, 0.8),
        "cityscapes-instance": (1024, 2048, 0.8),
        "mapillary-vistas-semantic": (2048, 2048, 0.0),
        "mapillary-vistas-panoptic": (2048, 2048, 0.0),
    }
    assert {n: (s.shortest_edge, s.longest_edge, s.threshold) for n, s in LABEL_SETS.items()} == official


def test_label_set_detected_from_the_file():
    from pipeline.label_sets import LabelSetUnknown, detect_label_set

    # A count one set has: that set. A count none has: generic names.
    assert detect_label_set(133, 100)[0].name == "coco-panoptic"
    assert detect_label_set(8, 200, "model_final.pth")[0].name == "cityscapes-instance"
    assert detect_label_set(5, 100) == (None, "no public label set has 5 classes: generic names, no things")
    # A shared count: the official model-zoo file name decides, else 200 queries (panoptic), else ask.
    label_set, why = detect_label_set(150, 100, "model_final_500878.pkl")
    assert (
        label_set.name == "ade20k-semantic"
        and why == "ade20k-semantic: the official model-zoo file model_final_500878.pkl"
    )
    assert detect_label_set(150, 100, "model_final_6b4a3a.pkl")[0].name == "ade20k-semantic-640"  # Swin-L res640
    assert detect_label_set(150, 100, "model_final_5c90d4.pkl")[0].name == "ade20k-panoptic"
    assert detect_label_set(19, 100, "model_final_cc1b1f.pkl")[0].name == "cityscapes-semantic"
    assert detect_label_set(65, 200, "model_final_90ee2d.pkl")[0].name == "mapillary-vistas-semantic"  # the name wins
    label_set, why = detect_label_set(150, 200, "my_run.pkl")
    assert label_set.name == "ade20k-panoptic" and "200 queries" in why
    assert detect_label_set(19, 200)[0].name == "cityscapes-panoptic"
    with pytest.raises(LabelSetUnknown) as e:
        detect_label_set(150, 100, "model_final_9fd0ae.pkl")  # a COCO zoo file's name: not one of these
    message = str(e.value)
    assert "\n" not in message and "--labels" in message
    for part in ("ade20k-semantic (512/2048)", "ade20k-semantic-640 (640/2560)", "ade20k-panoptic (640/2560, things)"):
        assert part in message
    with pytest.raises(LabelSetUnknown, match="mapillary-vistas-semantic .* mapillary-vistas-panoptic"):
        detect_label_set(65, 100, "model_final.pth")


def test_user_labels_json(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"id2label": {"0": "person", "1": "grass"}, "threshold": 0.5}))
    mine = read_labels_json(path)
    assert mine.labels == ("person", "grass") and mine.thing_ids == {0} and mine.threshold == 0.5
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read labels file"):
        read_labels_json(path)


@pytest.fixture(scope="module")
def ade_d2():
    """The d2 state dict of a tiny model with ADE20K's 150 classes."""
    return hf_to_d2(hf_model({**TINY, "num_labels": 150}, seed=5).state_dict())


def test_shared_class_count_loads_by_zoo_name_or_asks(ade_d2, tmp_path, capsys, caplog):
    zoo = save_pkl(ade_d2, tmp_path / "model_final_500878.pkl")
    with caplog.at_level("WARNING", logger="mask2former.detectron2"):
        cfg = load_model(zoo).config
    assert "ade20k-semantic: the official model-zoo file model_final_500878.pkl" in caplog.text  # said at load
    assert cfg.label_source == "ade20k-semantic: the official model-zoo file model_final_500878.pkl"
    assert (cfg.preprocess.shortest_edge, cfg.preprocess.longest_edge, cfg.thing_ids) == (512, 2048, frozenset())
    assert cfg.semantic_at_input_size and cfg.instance_thing_ids is None
    out = tmp_path / "converted"
    assert main(["convert", str(zoo), "--output", str(out)]) == 0
    assert load_model(out).config.label_source == cfg.label_source  # the folder remembers why
    # Renamed, nothing in the file decides: a one-line error that names the choices; --labels decides.
    renamed = save_pkl(ade_d2, tmp_path / "ade.pkl")
    err = one_line_error(capsys, ["convert", str(renamed), "--output", str(tmp_path / "out")])
    assert "150 classes can be ade20k-semantic (512/2048)" in err and "--labels" in err
    cfg = load_model(renamed, labels="ade20k-panoptic").config
    assert cfg.label_source is None and cfg.preprocess.shortest_edge == 640 and len(cfg.thing_ids) == 100
    assert not cfg.semantic_at_input_size and cfg.instance_thing_ids == cfg.thing_ids


# ---------------------------------------------------------------------------------------------- R50: export, serve
@pytest.fixture(scope="module")
def r50_pkl(tmp_path_factory):
    return save_pkl(hf_to_d2(hf_model(TINY_R50, seed=6).state_dict()), tmp_path_factory.mktemp("r50") / "r50.pkl")


@pytest.fixture(scope="module")
def r50_onnx(r50_pkl, tmp_path_factory):
    """``m2f export onnx`` straight from the d2 file, dynamic height and width (the exporter's check passes)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("r50-onnx") / "r50.onnx"
    assert main(["export", "onnx", "--weights", str(r50_pkl), "--output", str(out), "--dynamic-shape"]) == 0
    return out


def test_r50_exports_to_onnx(r50_pkl, r50_onnx, capsys):
    from model_export.onnx import _example_size
    from runtimes.onnx_runner import OnnxRunner

    model = load_model(r50_pkl)
    assert _example_size(model.config) == (264, 304)  # Swin's rule with window 7: no side a multiple of 32
    runner = OnnxRunner(r50_onnx)
    assert runner.config.backbone == model.config.backbone and runner.config.labels == model.config.labels
    x = torch.randn(1, 3, 100, 140, generator=torch.Generator().manual_seed(1))  # exported at batch 1
    class_logits, mask_logits = runner.run(x.numpy())
    with torch.inference_mode():
        ref = model(x)
    assert np.abs(class_logits - ref.class_logits.numpy()).max() <= REL_TOL * ref.class_logits.abs().max().item()
    assert np.abs(mask_logits - ref.mask_logits.numpy()).max() <= REL_TOL * ref.mask_logits.abs().max().item()


def test_r50_serves_through_both_runtimes(start_server, r50_pkl, r50_onnx):
    """``m2f serve --model`` the d2 file (PyTorch) and its export (ONNX Runtime): the segments are those of the
    model called directly (PyTorch: exactly; ONNX Runtime: up to boundary pixels, as in tests/test_service.py)."""
    import io

    from PIL import Image
    from pycocotools import mask as mask_util

    from pipeline import postprocess
    from pipeline.processing import preprocess

    model = load_model(r50_pkl)
    torch_server = start_server("--model", str(r50_pkl), "--max-batch-size", "1")
    ort_server = start_server("--model", str(r50_onnx), "--max-batch-size", "1")
    assert torch_server.client.get("/v1/model").json()["runtime"] == "torch"
    assert ort_server.client.get("/v1/model").json()["runtime"] == "onnxruntime"
    image = Image.fromarray((np.random.default_rng(3).random((48, 64, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    batch = preprocess([image], model.config.preprocess)
    with torch.inference_mode():
        out = model(torch.from_numpy(batch.pixel_values))
    args = (out.class_logits.numpy(), out.mask_logits.numpy(), batch.resized_sizes, batch.original_sizes)
    cfg = model.config
    semantic = postprocess.semantic_segmentation(*args, **cfg.postprocess_kwargs("semantic"))[0]
    instance_kwargs = {**cfg.postprocess_kwargs("instance"), "max_instances": 100}
    instance = postprocess.instance_segmentation(*args, **instance_kwargs)[0]
    for server, exact in ((torch_server, True), (ort_server, False)):
        for task in ("semantic", "instance"):
            r = server.client.post(
                "/v1/segment", content=buf.getvalue(), headers={"Content-Type": "image/png"}, params={"task": task}
            )
            assert r.status_code == 200, r.text
            segs = r.json()["segments"]
            masks = [mask_util.decode(s["segmentation"]).astype(bool) for s in segs]
            if task == "semantic":
                assert [s["category_id"] for s in segs] == np.unique(semantic).tolist()
                want = [semantic == s["category_id"] for s in segs]
            else:
                assert [s["category_id"] for s in segs] == instance.labels.tolist()
                assert [s["score"] for s in segs] == pytest.approx(
                    instance.scores.tolist(), abs=1e-5 if exact else 1e-4
                )
                want = list(instance.masks)
            for got, ref in zip(masks, want, strict=True):
                assert np.array_equal(got, ref) if exact else (got != ref).mean() <= 1e-3
