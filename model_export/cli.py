"""``m2f export onnx``: the export subcommands, added to the ``m2f`` parser by :func:`add_export_parser`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export`` (with its ``onnx`` subcommand) to ``m2f``'s subparsers; each sets ``run``."""
    export = subparsers.add_parser("export", help="export a checkpoint (ONNX), checked against PyTorch")
    targets = export.add_subparsers(dest="target", required=True)

    p = targets.add_parser(
        "onnx",
        help="export to ONNX and check it in ONNX Runtime",
        description=(
            "Export to ONNX: input pixel_values (B, 3, H, W), outputs class_logits (B, Q, K+1) and mask_logits "
            "(B, Q, H/4, W/4); labels, thing/stuff flags, preprocessing, thresholds and the checkpoint's hash "
            "travel in the file's metadata. The file is then checked: onnx.checker, no float64 (or other "
            "foreign float type), and ONNX Runtime against PyTorch within the tolerance."
        ),
    )
    p.add_argument(
        "--weights", type=Path, help="HF checkpoint folder or detectron2 .pkl/.pth file (default: the demo model)"
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="the .onnx file to write")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--dynamic-shape", action="store_true", help="dynamic height and width (the default)")
    shape.add_argument("--height", type=int, help="fixed input height (with --width)")
    p.add_argument("--width", type=int, help="fixed input width (with --height)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch size")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20; 18..23)")
    p.add_argument("--fp16", action="store_true", help="a float16 graph (input, outputs and every float tensor)")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="int8 weights for the CPU (dynamic quantization); check tolerance 0.1, measure ΔPQ on your data",
    )
    p.add_argument(
        "--tolerance", type=float, help="max |ORT - PyTorch| / max |PyTorch| (1e-4; 2e-2 with --fp16; 0.1 int8)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument(
        "--plugins",
        action="store_true",
        help=(
            "TensorRT plugin nodes for deformable attention (MultiscaleDeformableAttnPlugin_TRT) and masked attention "
            "(m2f::MaskedAttention) instead of standard ops; float32 only; checked with CPU reference ops "
            "(needs onnxruntime-extensions)"
        ),
    )
    p.set_defaults(run=_export_onnx)
    return export


def _export_onnx(args: argparse.Namespace) -> int:
    from model_export.check import ExportCheckError  # lazy: torch (m2f's parser is built without it)
    from model_export.onnx import DEFAULT_OPSET, export_onnx  # lazy: torch

    if (args.height is None) != (args.width is None):
        raise ValueError("--height and --width go together")
    from mask2former.weights import DEMO_WEIGHTS  # lazy: torch (mask2former.weights imports it)

    weights = args.weights if args.weights is not None else DEMO_WEIGHTS
    try:
        report = export_onnx(
            weights,
            args.output,
            height=args.height,
            width=args.width,
            dynamic_shape=args.dynamic_shape,
            batch=args.batch,
            dynamic_batch=args.dynamic_batch,
            opset=args.opset or DEFAULT_OPSET,
            fp16=args.fp16,
            quantize=args.quantize,
            check=not args.no_check,
            tolerance=args.tolerance,
            plugins=args.plugins,
            log=lambda line: print(line, file=sys.stderr),
        )
    except ExportCheckError as e:
        print(f"m2f export onnx: check failed: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
