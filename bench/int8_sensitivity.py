"""Which int8 MatMuls move the masked-attention masks? Per group of quantized MatMuls, quantize only that group
(or all but it) and measure what the masks and outputs do against the float32 PyTorch model.

    python bench/int8_sensitivity.py [--sizes 384 640] [--groups] [--json bench/results/int8_sensitivity.json]

The model is bench/common.py's swin-tiny COCO-panoptic checkpoint (random weights shaped like a trained
model's). It is exported once per size (float32, fixed size), prepared once as the exporter prepares it
(ONNX Runtime's quantization pre-processing), and then quantized as ``m2f export onnx --quantize int8`` does
(dynamic, int8 weights per output channel, stored as uint8) with the other MatMuls left out
(``nodes_to_exclude``). Groups are the modules the exporter recorded for each MatMul (backbone stage, pixel
decoder, decoder layer, mask head, class head).

Per configuration, on one standard-normal image (seed 0), against PyTorch float32:

- ``l0_flips``: mask-logit signs at decoder layer 0 that differ (the first masked attention: a flip there
  changes what a query attends to in every later layer);
- ``l0_margin``: the largest |logit| / max |logit| among those flips. The exporter's check accepts a flip only
  within ``INT8_TOLERANCE`` (0.1) of 0, so this is how close the export is to failing its check;
- ``l0_rel``: max |diff| / max |logit| of layer 0's mask logits;
- ``flips_per_layer`` and ``worst_margin``: the same sign flips and margin for every layer's mask logits (later
  layers attend with masks that earlier flips changed: this is the cascade the check sees);
- ``mask_sign``: share of output mask logits with PyTorch's sign; ``class_rel``: max |diff| / max |logit| of
  the class logits;
- with ``--check``, the exporter's own check (``check_against_pytorch``) on the rows that are not groups.

Rows: float32, all int8, the heads (mask head, class head) kept float, the exporter's rule
(``model_export.int8.float_matmuls``: ``FLOAT_MODULES``, the heads and the pixel decoder kept float), and with ``--groups`` each group "only" (just it int8) and "without" (all but it int8).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_checkpoint, checkpoint_folder, full_setting, machine_info  # noqa: E402
from mask2former import load_model  # noqa: E402
from model_export.check import INT8_TOLERANCE, check_against_pytorch  # noqa: E402
from model_export.int8 import FLOAT_MODULES, float_matmuls, prepare, quantize_prepared  # noqa: E402
from model_export.onnx import export_onnx  # noqa: E402
from runtimes.ort_session import available_cpus, open_session, session_options  # noqa: E402

GROUP = re.compile(
    r"model\.(backbone\.stages\.\d+|pixel_decoder\.encoder|pixel_decoder|decoder\.layers\.\d+|decoder\.mask_head|"
    r"decoder\.class_head|decoder)"
)


def groups(fp32: onnx.ModelProto, prepared: onnx.ModelProto, leaves: bool = False) -> dict[str, list[str]]:
    """The prepared graph's quantizable MatMuls (constant weight) by the module the exporter recorded for the
    float32 node they came from (ONNX Runtime's pre-processing keeps the name before a '/'); ``leaves``: the
    pixel decoder's by their linear layer's name (``sampling_offsets``, ``fc1``, ...) instead."""
    scope = {}
    for node in fp32.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                path = ast.literal_eval(prop.value)[-2]
                match = GROUP.match(path)
                scope[node.name] = match.group(1) if match else "other"
                if leaves and scope[node.name].startswith("pixel_decoder"):
                    scope[node.name] = "pixel_decoder.*." + path.rsplit(".", 1)[-1]
    weights = {i.name for i in prepared.graph.initializer}
    found: dict[str, list[str]] = {}
    for node in prepared.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
            found.setdefault(scope.get(node.name.split("/")[0], "other"), []).append(node.name)
    return found


def measure(proto: onnx.ModelProto, x: np.ndarray, ref, einsums: list[str]) -> dict[str, float]:
    """The module docstring's figures for one graph against PyTorch's outputs ``ref`` on ``x``; ``einsums``:
    the names of the per-layer mask products (the graph's Einsum outputs but the last, the mask output)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for name in einsums:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = open_session(probe.SerializeToString(), session_options(available_cpus()), ["CPUExecutionProvider"])
    class_logits, mask_logits, *layers = session.run(["class_logits", "mask_logits", *einsums], {"pixel_values": x})
    flips, margins = [], []
    for got, want in zip(layers, ref.attention_logits):  # per decoder layer: the logits it attends with
        want = want.numpy()
        flipped = np.sign(got) != np.sign(want)
        flips.append(int(flipped.sum()))
        margins.append(float(np.abs(want[flipped]).max() / np.abs(want).max()) if flipped.any() else 0.0)
    l0, want0 = layers[0], ref.attention_logits[0].numpy()
    want_cls, want_mask = ref.class_logits.numpy(), ref.mask_logits.numpy()
    return {
        "l0_flips": flips[0],
        "l0_margin": margins[0],
        "l0_rel": float(np.abs(l0 - want0).max() / np.abs(want0).max()),
        "flips_per_layer": flips,
        "worst_margin": max(margins),
        "mask_sign": float((np.sign(mask_logits) == np.sign(want_mask)).mean()),
        "class_rel": float(np.abs(class_logits - want_cls).max() / np.abs(want_cls).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[384])
    parser.add_argument("--groups", action="store_true", help="also each group only / all but each group")
    parser.add_argument("--leaves", action="store_true", help="group the pixel decoder by linear layer")
    parser.add_argument("--only", nargs="*", default=[], help="just these rows (names as printed)")
    parser.add_argument("--check", action="store_true", help="also run the exporter's check on the non-group rows")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint and exports here (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    setting = full_setting()
    out = {"machine": machine_info(available_cpus()), "tolerance": INT8_TOLERANCE, "sizes": {}}
    print(f"{datetime.date.today()} {out['machine']['cpu']}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        folder = build_checkpoint(setting, checkpoint_folder(work, setting, 0), 0)
        model = load_model(folder).eval()
        for size in args.sizes:
            fp32_path = work / f"{setting.name}-{size}.onnx"
            if not fp32_path.is_file():
                export_onnx(folder, fp32_path, height=size, width=size, check=False, log=None)
            fp32 = onnx.load(str(fp32_path))
            prepared = prepare(fp32_path, work / f"{setting.name}-{size}-prepared.onnx")
            einsums = [n.output[0] for n in fp32.graph.node if n.op_type == "Einsum"][:-1]
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                ref = model(x, aux=True)
            found = groups(fp32, onnx.load(str(prepared)), args.leaves)
            every = [name for names in found.values() for name in names]
            rule = float_matmuls(onnx.load(str(prepared)), fp32)
            heads = float_matmuls(onnx.load(str(prepared)), fp32, FLOAT_MODULES[1:])
            configs: dict[str, list[str] | None] = {
                "float32": None,
                "all int8": [],
                "heads float": heads,
                "rule (exporter)": rule,
            }
            if args.groups:
                for group, names in found.items():
                    configs[f"only {group}"] = [n for n in every if n not in names]
                    configs[f"without {group}"] = names
            if args.only:
                configs = {k: v for k, v in configs.items() if k in args.only}
            rows = {}
            print(
                f"{size}x{size}: {len(every)} quantizable MatMuls; {', '.join(f'{k} {len(v)}' for k, v in found.items())}"
            )
            for name, exclude in configs.items():
                t0 = time.perf_counter()
                proto = fp32 if exclude is None else quantize_prepared(prepared, exclude)
                row = measure(proto, x.numpy(), ref, einsums)
                row["float_matmuls"] = len(every) if exclude is None else len(exclude)
                if args.check and not name.startswith(("only", "without")):
                    (result,) = check_against_pytorch(proto, model, [x.numpy()], INT8_TOLERANCE)
                    row["check"] = result.describe()
                    row["check_passed"] = result.passed
                rows[name] = row
                print(
                    f"  {name:34s} float {row['float_matmuls']:3d}: layer 0 flips {row['l0_flips']:6d} "
                    f"(largest at {row['l0_margin']:.3f} of max |logit|), rel {row['l0_rel']:.2e}; all layers "
                    f"{sum(row['flips_per_layer'])} flips, largest at {row['worst_margin']:.3f}; "
                    f"mask signs {row['mask_sign']:.4%}, class rel {row['class_rel']:.2e} "
                    f"({time.perf_counter() - t0:.0f}s)" + (f"\n      check: {row['check']}" if "check" in row else ""),
                    flush=True,
                )
            out["sizes"][size] = {"groups": {k: len(v) for k, v in found.items()}, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
