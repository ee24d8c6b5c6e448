"""The service's settings: few, each documented with what changing it does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import Settings

SERVING_DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


def test_at_most_thirteen_settings_each_in_the_documented_table_and_described():
    fields = Settings.model_fields
    assert len(fields) <= 13, list(fields)  # twelve, and the API keys (several models, issue 35)
    rows = [line for line in SERVING_DOC.read_text().splitlines() if line.startswith("| `M2F_")]
    for name, field in fields.items():
        row = next((r for r in rows if f"`M2F_{name.upper()}`" in r), None)
        assert row is not None, f"M2F_{name.upper()} has no row in the settings table of docs/serving.md"
        assert len(re.sub(r"`[^`]*`", "", row.split("|")[-2]).strip()) > 10, f"M2F_{name.upper()}: say what it does"
        assert field.description, name


def test_the_runtime_follows_the_model_file_and_the_drain_the_deadline(tmp_path):
    onnx = tmp_path / "m.onnx"
    assert Settings(model=onnx).runtime == "onnxruntime"
    (tmp_path / "config.json").write_text("{}")  # an HF checkpoint folder
    assert Settings(model=tmp_path).runtime == "torch"
    assert Settings(request_timeout_s=7).drain_timeout_s == 7


def test_several_models_by_name_or_from_a_model_repository(tmp_path):
    from service.settings import ModelSource

    assert Settings(model="coco=/m/coco.onnx, ade=/m/ade").model_sources() == [
        ModelSource("coco", Path("/m/coco.onnx")),
        ModelSource("ade", Path("/m/ade")),
    ]
    assert Settings(model="/m/one.onnx").model_sources() == [ModelSource("default", Path("/m/one.onnx"))]
    # an .onnx file may name its runner; a path that exists as written is taken whole
    assert Settings(model="fast=/m/a.onnx@openvino-bf16, b=/m/b.onnx@onnxruntime").model_sources() == [
        ModelSource("fast", Path("/m/a.onnx"), "openvino-bf16"),
        ModelSource("b", Path("/m/b.onnx"), "onnxruntime"),
    ]
    assert Settings(model="/m/one.onnx@openvino").model_sources() == [
        ModelSource("default", Path("/m/one.onnx"), "openvino")
    ]
    assert Settings(model="/m/one.onnx@openvino").runtime == "openvino"
    odd = tmp_path / "odd.onnx@openvino"
    odd.write_bytes(b"")
    assert Settings(model=str(odd)).model_sources() == [ModelSource("default", odd)]
    with pytest.raises(ValueError, match="only an .onnx file can name its runtime"):
        Settings(model="a=/m/checkpoint@openvino")
    for bad, why in (("a.onnx,b.onnx", "must differ"), ("Big=/m/a.onnx", "model name"), ("a b=/x", "model name")):
        with pytest.raises(ValueError, match=why):
            Settings(model=bad)
    repo = tmp_path / "models"
    (repo / "zeta").mkdir(parents=True)
    (repo / "zeta" / "model.onnx").write_bytes(b"")
    (repo / "default").mkdir()
    (repo / "default" / "config.json").write_text("{}")
    (repo / "alpha").mkdir()
    (repo / "alpha" / "model_final.pkl").write_bytes(b"")
    sources = Settings(model=repo).model_sources()
    assert sources == [
        ModelSource("default", repo / "default"),  # the default first
        ModelSource("alpha", repo / "alpha" / "model_final.pkl"),
        ModelSource("zeta", repo / "zeta" / "model.onnx"),
    ]
    (repo / "empty").mkdir()
    with pytest.raises(ValueError, match="empty/ holds no model file"):
        Settings(model=repo)
