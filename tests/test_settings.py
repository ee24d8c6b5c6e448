"""The service's settings: few, each documented with what changing it does."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

SERVING_DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


def test_at_most_twelve_settings_each_in_the_documented_table_and_described():
    fields = Settings.model_fields
    assert len(fields) <= 12, list(fields)
    rows = [line for line in SERVING_DOC.read_text().splitlines() if line.startswith("| `M2F_")]
    for name, field in fields.items():
        row = next((r for r in rows if f"`M2F_{name.upper()}`" in r), None)
        assert row is not None, f"M2F_{name.upper()} has no row in the settings table of docs/serving.md"
        assert len(re.sub(r"`[^`]*`", "", row.split("|")[-2]).strip()) > 10, f"M2F_{name.upper()}: say what it does"
        assert field.description, name


def test_the_runtime_follows_the_model_file_and_the_drain_the_deadline(tmp_path):
    onnx = tmp_path / "m.onnx"
    assert Settings(model=onnx).runtime == "onnxruntime"
    assert Settings(model=tmp_path).runtime == "torch"
    assert Settings(request_timeout_s=7).drain_timeout_s == 7
