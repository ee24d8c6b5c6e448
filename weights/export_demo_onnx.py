"""Regenerate ``weights/demo/model.onnx``: the demo checkpoint exported to ONNX (float32, dynamic batch and
image size) by the project's exporter, checked against PyTorch as every export is.

The file ships with the repository so that ``pip install ".[serve]" && m2f serve`` serves the demo model
through ONNX Runtime without torch. Run this (torch and the ``onnx`` extra installed) after retraining the
demo model; ``tests/test_lean_install.py`` fails while the shipped file is stale.

    python weights/export_demo_onnx.py            # writes weights/demo/model.onnx
    python weights/export_demo_onnx.py --output other.onnx
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from model_format.metadata import write_metadata

DEMO = Path(__file__).resolve().parent / "demo"
# Recorded in the file's metadata instead of this machine's absolute path.
SOURCE = "weights/demo"


def export_demo(output: Path, log=print) -> Path:
    """Export the demo checkpoint to ``output`` (checked against PyTorch, else ``ExportCheckError``)."""
    import onnx  # lazy: onnx (the onnx extra), only to export

    from model_export.onnx import export_onnx  # lazy: the exporter (torch, onnx), only to export

    report = export_onnx(DEMO, output, dynamic_shape=True, dynamic_batch=True, log=log)
    proto = onnx.load(str(output))
    write_metadata(proto, replace(report.metadata, source=SOURCE))
    onnx.save_model(proto, str(output))
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEMO / "model.onnx")
    args = parser.parse_args()
    path = export_demo(args.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
