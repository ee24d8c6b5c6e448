"""Checkpoint loading: key mapping, both HF layouts, loud failures, and config reading."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from mask2former import load_model, read_config
from mask2former.mask2former import Mask2Former
from mask2former.reference import TINY, hf_model
from mask2former.weights import CheckpointMismatch, convert_hf_state_dict, read_hf_state_dict
from pipeline.labels import COCO_THINGS

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference():
    return hf_model(TINY, seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, reference):
    folder = tmp_path_factory.mktemp("tiny")
    reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_state(reference):
    """The transformers 5.x layout: the names of the in-memory model."""
    state = reference.state_dict()
    assert any(".attention.q_proj." in k for k in state)
    return state


@pytest.fixture(scope="module")
def legacy_state(checkpoint):
    """The transformers 4.x layout, which the public hub checkpoints use and ``save_pretrained`` still
    writes: ``attention.self.query``, ``intermediate.dense``, ..."""
    state = read_hf_state_dict(checkpoint)
    assert any(".attention.self.query." in k for k in state)
    return state


@pytest.fixture(scope="module")
def expected(checkpoint):
    return {k: v.shape for k, v in Mask2Former(read_config(checkpoint)).state_dict().items()}


def test_convert_produces_exactly_the_model_keys(hf_state, expected):
    ours = convert_hf_state_dict(hf_state, expected)
    assert set(ours) == set(expected)
    assert all(tuple(ours[k].shape) == tuple(expected[k]) for k in ours)


def test_qkv_fused_in_q_k_v_order(hf_state, expected):
    ours = convert_hf_state_dict(hf_state, expected)
    prefix = "model.pixel_level_module.encoder.swin.encoder.layers.1.blocks.0.attention."
    fused = ours["backbone.stages.1.blocks.0.attn.qkv.weight"]
    parts = [hf_state[prefix + f"{p}_proj.weight"] for p in "qkv"]
    torch.testing.assert_close(fused, torch.cat(parts), rtol=0, atol=0)
    dec = "model.transformer_module.decoder.layers.0.self_attn."
    torch.testing.assert_close(
        ours["decoder.layers.0.self_attn.in_proj_bias"], torch.cat([hf_state[dec + f"{p}_proj.bias"] for p in "qkv"])
    )


def test_legacy_layout_loads_identically(hf_state, legacy_state, expected):
    legacy = dict(legacy_state)
    # The hub checkpoints also hold Swin's index buffers and the loss's class weights: not weights we use.
    for key in list(legacy):
        if key.endswith("attention.self.relative_position_bias_table"):
            legacy[key.replace("bias_table", "index")] = torch.zeros(1, dtype=torch.long)
    legacy["criterion.empty_weight"] = torch.ones(6)
    a = convert_hf_state_dict(hf_state, expected)
    b = convert_hf_state_dict(legacy, expected)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_missing_key_is_named(hf_state, expected):
    state = dict(hf_state)
    del state["model.transformer_module.decoder.layers.1.fc2.weight"]
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(state, expected)
    assert e.value.missing == ["decoder.layers.1.fc2.weight"]
    assert "decoder.layers.1.fc2.weight" in str(e.value)


def test_unused_key_is_named(hf_state, expected):
    state = dict(hf_state)
    state["model.some_new_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(state, expected)
    assert e.value.unused == ["model.some_new_head.weight"] and not e.value.missing


def test_key_beyond_the_config_is_unused(hf_state, expected):
    # A checkpoint with more decoder layers than the config describes must not load silently.
    state = dict(hf_state)
    state["model.transformer_module.decoder.layers.7.fc1.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(state, expected)
    assert any("layers.7.fc1.weight" in k for k in e.value.unused)


def test_misshaped_key_is_named(hf_state, expected):
    state = dict(hf_state)
    state["class_predictor.weight"] = torch.zeros(9, 64)
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(state, expected)
    assert len(e.value.misshaped) == 1 and "class_predictor.weight" in e.value.misshaped[0]
    assert "(9, 64)" in str(e.value)


def test_partial_qkv_is_an_error(hf_state, expected):
    state = dict(hf_state)
    del state["model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.0.attention.k_proj.weight"]
    with pytest.raises(CheckpointMismatch) as e:
        convert_hf_state_dict(state, expected)
    assert "backbone.stages.0.blocks.0.attn.qkv.weight" in e.value.missing
    assert any("q_proj.weight" in k for k in e.value.unused)


def test_pytorch_bin_and_safetensors_load_the_same(checkpoint, tmp_path, hf_state):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    torch.save(hf_state, tmp_path / "pytorch_model.bin")
    a, b = load_model(checkpoint), load_model(tmp_path)
    assert not a.training and not b.training
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        torch.testing.assert_close(a(x).mask_logits, b(x).mask_logits, rtol=0, atol=0)


def test_sharded_safetensors(checkpoint, tmp_path, hf_state):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    keys = sorted(hf_state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: hf_state[k].contiguous() for k in ks}, tmp_path / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert set(read_hf_state_dict(tmp_path)) == set(hf_state)


def test_folder_without_weights_fails_clearly(checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")


def test_config_reading(checkpoint, tmp_path):
    cfg = read_config(checkpoint)
    assert cfg.decoder_layers == TINY["decoder_layers"] - 1  # HF counts the query prediction as a layer
    assert cfg.num_labels == 5 and cfg.labels[0] == "class_0"
    assert cfg.thing_ids == frozenset()  # unknown names are stuff
    assert cfg.backbone.window_size == 4 and cfg.backbone.depths == (1, 1, 2, 1)

    d = json.loads((checkpoint / "config.json").read_text())
    names = ["person", "car", "sky", "wall-other-merged", "teddy bear"]
    d["id2label"] = {str(i): n for i, n in enumerate(names)}
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 384, "longest_edge": 512},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.5, 1.0],
            }
        )
    )
    cfg = read_config(tmp_path)
    assert cfg.thing_ids == {0, 1, 4}  # COCO thing names
    assert (cfg.preprocess.shortest_edge, cfg.preprocess.longest_edge) == (384, 512)
    assert cfg.preprocess.mean == pytest.approx((127.5,) * 3) and cfg.preprocess.std == pytest.approx(
        (63.75, 127.5, 255.0)
    )

    d["thing_ids"] = [2]  # an explicit list wins over names
    d["threshold"] = 0.35  # our post-processing defaults travel in config.json
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert read_config(tmp_path).thing_ids == {2}
    assert read_config(tmp_path).threshold == 0.35 and read_config(tmp_path).overlap_mask_area_threshold == 0.8


def test_coco_thing_list_is_complete():
    assert len(COCO_THINGS) == len(set(COCO_THINGS)) == 80


def test_hf_config_round_trip(checkpoint):
    cfg = read_config(checkpoint)
    from pipeline.config import Mask2FormerConfig

    again = Mask2FormerConfig.from_hf_dict(cfg.to_hf_dict())
    assert again.backbone == cfg.backbone
    assert again.decoder_layers == cfg.decoder_layers and again.id2label == cfg.id2label
    assert (again.threshold, again.mask_threshold, again.overlap_mask_area_threshold) == (0.8, 0.5, 0.8)
    assert again.instance_threshold is None and again.label_source is None  # no score threshold: the official
    mine = replace(cfg, instance_threshold=0.25, label_source="mine: given")
    again = Mask2FormerConfig.from_hf_dict(json.loads(json.dumps(mine.to_hf_dict())))
    assert (again.instance_threshold, again.label_source) == (0.25, "mine: given")


def test_task_defaults_follow_the_official_configs():
    from mask2former.weights import DEMO_WEIGHTS
    from pipeline.config import Mask2FormerConfig

    cfg = read_config(DEMO_WEIGHTS)  # things and stuff: as the official panoptic configs
    assert cfg.thing_ids == {0, 1, 2, 3, 4} and cfg.num_labels == 8
    assert cfg.postprocess_kwargs("panoptic") == {
        "thing_ids": cfg.thing_ids,
        "threshold": cfg.threshold,
        "mask_threshold": cfg.mask_threshold,
        "overlap_mask_area_threshold": cfg.overlap_mask_area_threshold,
    }
    assert cfg.postprocess_kwargs("instance") == {"threshold": None, "thing_ids": cfg.thing_ids}
    assert cfg.postprocess_kwargs("semantic") == {"at_input_size": False}
    things_only = replace(cfg, thing_ids=frozenset(range(cfg.num_labels)))  # instance configs: no filter needed
    assert things_only.postprocess_kwargs("instance")["thing_ids"] is None
    assert not things_only.semantic_at_input_size
    semantic = replace(cfg, thing_ids=frozenset({cfg.num_labels + 3}))  # no thing among its classes
    assert semantic.postprocess_kwargs("semantic") == {"at_input_size": True}
    assert semantic.instance_thing_ids is None
    with pytest.raises(ValueError, match="unknown task"):
        Mask2FormerConfig().postprocess_kwargs("depth")


def test_to_hf_state_dict_inverts_the_mapping(hf_state, expected):
    from mask2former.weights import match_hf_key, to_hf_state_dict

    ours = convert_hf_state_dict(hf_state, expected)
    back = to_hf_state_dict(ours, list(hf_state))
    ignored = {
        "criterion.empty_weight",
        *(f"model.pixel_level_module.encoder.swin.layernorm.{p}" for p in ("weight", "bias")),
    }
    assert {k for k in hf_state if match_hf_key(k) is None} == ignored
    assert set(back) == set(hf_state) - ignored
    for k, v in back.items():
        torch.testing.assert_close(v, hf_state[k], rtol=0, atol=0)
