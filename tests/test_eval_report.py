"""``m2f eval --model A --model B --report DIR``: backends compared on the demo model and its ONNX exports.

One float32 export of the demo model (fixed 160x160 input, dynamic batch: the one ``tests/conftest.py`` makes
for the whole run), its int8 version made by the exporter's quantization step, and a copy of
the float32 graph edited so that one class can never win (its logit pushed down by 1e4) play the backends,
on 6 synthetic images.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from m2f import synth  # noqa: E402
from m2f.cli import main  # noqa: E402
from m2f.eval_data import find_layout  # noqa: E402
from m2f.eval_images import segment_changes  # noqa: E402
from m2f.eval_report import SCHEMA, compare, open_backend, parse_spec  # noqa: E402
from mask2former.weights import DEMO_WEIGHTS  # noqa: E402
from pipeline.postprocess import PanopticResult, Segment  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")

NUM_IMAGES, SEED = 6, 1000
KILLED = synth.RING  # the class the corrupted graph can never predict
TOP_KEYS = {
    "schema", "created", "command", "versions", "data", "settings", "backends", "classes", "summary", "metrics",
    "per_class", "disagreement", "worst", "timings", "images",
}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    synth.write_dataset(folder, NUM_IMAGES, SEED)
    return folder


def kill_class(src: Path, dst: Path, label: int) -> Path:
    """A copy of an exported graph whose class logit ``label`` is lowered by 1e4: that class never wins."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if "class_logits" in n.output)
    node.output[list(node.output).index("class_logits")] = "class_logits_raw"
    classes = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value  # K + 1
    bias = np.zeros(classes, np.float32)
    bias[label] = -1e4
    model.graph.initializer.append(numpy_helper.from_array(bias, "kill_class"))
    model.graph.node.append(helper.make_node("Add", ["class_logits_raw", "kill_class"], ["class_logits"]))
    onnx.save_model(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def exports(demo_onnx, demo_onnx_int8, tmp_path_factory) -> dict[str, Path]:
    """fp32 through the exporter; int8 = the exporter's quantization step on that graph (both shared with other
    modules, tests/conftest.py); the class-killed copy."""
    killed = kill_class(demo_onnx, tmp_path_factory.mktemp("onnx") / "demo-killed.onnx", KILLED)
    return {"fp32": demo_onnx, "int8": demo_onnx_int8, "killed": killed}


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory, data, exports) -> tuple[dict, Path]:
    """``m2f eval --model demo --model fp32 --model int8 --report DIR --json``: (printed JSON, DIR)."""
    out = tmp_path_factory.mktemp("report")
    argv = ["eval", "--data", str(data), "--model", str(DEMO_WEIGHTS), "--model", str(exports["fp32"])]
    argv += ["--model", str(exports["int8"]), "--report", str(out), "--json", "--batch-size", "4"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return json.loads(stdout.getvalue()), out


@pytest.fixture(scope="module")
def killed_report(data, exports):
    backends = [open_backend(str(exports["fp32"])), open_backend(f"ring-killed={exports['killed']}")]
    return compare(backends, data, progress=False, worst=4)


def eval_json(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json", "--batch-size", "4"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------- scores
def test_report_scores_equal_separate_eval_runs(cli_report, data, exports, capsys):
    report, folder = cli_report
    assert set(report) == TOP_KEYS and report["schema"] == SCHEMA
    assert json.loads((folder / "report.json").read_text()) == report
    labels = [b["label"] for b in report["backends"]]
    assert labels == ["torch-fp32", "onnx-fp32", "onnx-int8"]
    assert report["data"]["tasks"] == ["panoptic", "instance", "semantic"]
    assert report["data"]["num_images"] == NUM_IMAGES and len(report["images"]) == NUM_IMAGES

    flags = {"torch-fp32": ["--weights", str(DEMO_WEIGHTS)], "onnx-fp32": ["--onnx", str(exports["fp32"])]}
    flags["onnx-int8"] = ["--onnx", str(exports["int8"])]
    for label, flag in flags.items():
        alone = eval_json(capsys, *flag, "--data", str(data))["metrics"]
        assert report["metrics"][label]["panoptic"]["all"] == alone["all"], label
        assert report["metrics"][label]["panoptic"]["things"] == alone["things"], label
        assert report["metrics"][label]["panoptic"]["stuff"] == alone["stuff"], label
    for task in ("instance", "semantic"):  # the other tasks, for one backend
        alone = eval_json(capsys, "--onnx", str(exports["int8"]), "--data", str(data), "--task", task)["metrics"]
        got = report["metrics"]["onnx-int8"][task]
        assert {k: got[k] for k in alone if k != "per_class"} == {k: v for k, v in alone.items() if k != "per_class"}

    pq = next(r for r in report["summary"] if r["metric"] == "PQ")
    assert pq["values"]["torch-fp32"] == report["metrics"]["torch-fp32"]["panoptic"]["all"]["pq"]
    assert pq["delta"]["onnx-int8"] == pytest.approx(pq["values"]["onnx-int8"] - pq["values"]["torch-fp32"])
    assert pq["delta"]["onnx-fp32"] == pytest.approx(0.0, abs=1e-9)  # the float32 graph computes what torch does


def test_report_says_what_produced_it(cli_report, exports):
    from model_format.metadata import checkpoint_sha256, file_sha256

    report, folder = cli_report
    by_label = {b["label"]: b for b in report["backends"]}
    assert by_label["onnx-int8"]["sha256"] == file_sha256(exports["int8"])
    assert by_label["onnx-int8"]["precision"] == "int8" and by_label["onnx-fp32"]["precision"] == "fp32"
    assert by_label["torch-fp32"]["sha256"] == checkpoint_sha256(DEMO_WEIGHTS)[0]
    assert by_label["onnx-fp32"]["source_sha256"] == by_label["torch-fp32"]["sha256"]  # exported from it
    assert report["command"].startswith("m2f eval --data ") and f"--model {exports['int8']}" in report["command"]
    assert report["data"]["annotation_sha256"]["panoptic.json"] == file_sha256(
        Path(report["data"]["root"]) / "panoptic.json"
    )
    for t in report["timings"].values():
        assert t["images"] == NUM_IMAGES and t["inference_s"] > 0 and t["load_s"] > 0


# ---------------------------------------------------------------------------------------------- failures
def test_a_killed_class_is_named_and_its_images_ranked_first(killed_report, data):
    report, pictures = killed_report
    gt = json.loads((data / "panoptic.json").read_text())["annotations"]
    with_class = {a["image_id"] for a in gt if any(s["category_id"] == KILLED for s in a["segments_info"])}
    assert 0 < len(with_class) < NUM_IMAGES

    top = report["per_class"][0]
    assert top["name"] == "ring" and top["backends"]["ring-killed"]["pq"] == 0.0
    assert top["delta"]["ring-killed"]["pq"] == pytest.approx(-top["backends"]["onnx-fp32"]["pq"])
    assert top["drop"] >= top["backends"]["onnx-fp32"]["pq"] > 30
    assert all(r["drop"] < top["drop"] for r in report["per_class"][1:])

    # The images that hold the class come first where the backends disagree, each with a segment lost.
    listed = [r["image_id"] for r in report["disagreement"]]
    assert set(listed[: len(with_class)]) == with_class
    for r in report["disagreement"][: len(with_class)]:
        changes = r["backends"]["ring-killed"]
        assert changes["lost"] + changes["relabelled"] >= 1
        assert any(x["label"] == "ring" for x in changes["changes"]["lost"]) or any(
            x["from"] == "ring" for x in changes["changes"]["relabelled"]
        )
    # ... and against the ground truth they miss it.
    worst = report["worst"]["ring-killed"]
    assert worst[0]["image_id"] in with_class and worst[0]["missed"].get("ring", 0) >= 1
    for row in report["images"]:
        if row["image_id"] in with_class:
            assert row["quality"]["ring-killed"]["missed"].get("ring", 0) >= 1
    assert set(pictures) >= set(listed) | {r["image_id"] for r in worst}
    assert all(set(p) == {"image", "gt", "onnx-fp32", "ring-killed"} for p in pictures.values())


def test_segment_changes_on_hand_made_outputs():
    names = {0: "a", 1: "b", 2: "c", 5: "d", 6: "e"}
    a_ids = np.zeros((10, 10), np.int32)
    a_ids[:, :5], a_ids[:, 5:], a_ids[1:3, 1:3] = 1, 2, 3  # left "a", right "d", a small "b" inside the left
    b_ids = a_ids.copy()
    b_ids[1:3, 1:3] = 1  # "b" lost into the left segment
    b_ids[7:9, 7:9] = 4  # a new "c" inside the right one
    a = PanopticResult(
        a_ids, [Segment(1, 0, 0.9, True, 46), Segment(2, 5, 0.9, False, 50), Segment(3, 1, 0.9, True, 4)]
    )
    b = PanopticResult(
        b_ids, [Segment(1, 0, 0.9, True, 50), Segment(2, 6, 0.9, False, 46), Segment(4, 2, 0.9, True, 4)]
    )
    d = segment_changes(a, b, names)
    assert (d["added"], d["lost"], d["relabelled"]) == (1, 1, 1)
    assert d["changes"]["relabelled"] == [{"from": "d", "to": "e", "area": 50}]
    assert d["changes"]["lost"] == [{"label": "b", "area": 4}] and d["changes"]["added"] == [{"label": "c", "area": 4}]
    assert d["pixel_disagreement"] == pytest.approx(0.54)  # the right half changed class, and b's 4 pixels
    same = segment_changes(a, a, names)
    assert (same["added"], same["lost"], same["relabelled"], same["pixel_disagreement"]) == (0, 0, 0, 0.0)


# ---------------------------------------------------------------------------------------------- the page
def chromium() -> str:
    exe = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    if exe is None:
        message = "headless Chromium renders the report page (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


PROBE = """<script>addEventListener("load", () => { const imgs = [...document.images];
document.body.dataset.probe = JSON.stringify({images: imgs.length, decoded: imgs.filter(i => i.complete &&
i.naturalWidth > 0 && i.naturalHeight > 0).length, svgs: document.querySelectorAll("svg rect").length,
rows: document.querySelectorAll("tr").length, height: document.body.scrollHeight}); });</script>"""


def test_html_report_renders_in_chromium_with_its_pictures(cli_report, tmp_path):
    exe = chromium()
    report, folder = cli_report
    page = (folder / "report.html").read_text()
    # Self-contained: nothing to fetch, no script.
    assert (
        not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page) and "<script" not in page and "<link" not in page
    )
    assert page.count("<img ") > 0 and page.count('src="data:image/jpeg;base64,') == page.count("<img ")
    for b in report["backends"]:
        assert b["sha256"] in page
    assert html.escape(report["command"]) in page

    probed = tmp_path / "probed.html"  # the page plus a load-time probe; the report itself has no script
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom", probed.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    probe = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert probe["images"] == page.count("<img ") and probe["decoded"] == probe["images"]
    assert probe["svgs"] > 0 and probe["rows"] > len(report["per_class"]) and probe["height"] > 1000
    labels = [b["label"] for b in report["backends"]]
    for r in report["disagreement"]:  # each listed image: the image, its ground truth, every backend
        row = re.search(rf'<div class="row" id="img-{r["image_id"]}">(.*?)(<div class="row"|<h2)', dom, re.S)
        assert row is not None and row.group(1).count("<img ") == 2 + len(labels)


# ---------------------------------------------------------------------------------------------- data and CLI
def coco_copy(src: Path, dst: Path, split: str = "val") -> Path:
    """``src`` (m2f synth) in COCO's layout with COCO-like ids: categories 1-based, segment ids in the millions
    (COCO's PNGs are colours), names unchanged; no semantic PNGs."""
    from PIL import Image

    from m2f.evaluate import read_id_map

    def big(i: int) -> int:
        return i * 1_000_003 + 7 if i else 0

    ann = dst / "annotations"
    (ann / f"panoptic_{split}").mkdir(parents=True)
    shutil.copytree(src / "images", dst / split)
    for png in sorted((src / "panoptic").glob("*.png")):
        ids = np.vectorize(big)(read_id_map(png))
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(ann / f"panoptic_{split}" / png.name)
    for name, out in (("panoptic.json", f"panoptic_{split}.json"), ("instances.json", f"instances_{split}.json")):
        d = json.loads((src / name).read_text())
        for c in d["categories"]:
            c["id"] += 1
        for a in d["annotations"]:
            for s in a.get("segments_info", [a]):
                s["category_id"] += 1
                if "segments_info" in a:
                    s["id"] = big(s["id"])
        (ann / out).write_text(json.dumps(d))
    return dst


def test_coco_layout_with_other_category_ids(cli_report, data, exports, tmp_path):
    report, _ = cli_report
    coco = coco_copy(data, tmp_path / "coco")
    layout = find_layout(coco)
    assert layout.split == "val" and layout.semantic_dir is None and layout.images == coco / "val"
    fp32 = open_backend(str(exports["fp32"]))
    alone, _ = compare([fp32], coco, progress=False)
    want = report["metrics"]["onnx-fp32"]
    assert alone["metrics"]["onnx-fp32"]["panoptic"]["all"] == want["panoptic"]["all"]
    assert alone["metrics"]["onnx-fp32"]["instance"]["AP"] == want["instance"]["AP"]
    # Without semantic PNGs the class maps come from the panoptic ground truth: synth's PNGs are the same maps.
    assert alone["metrics"]["onnx-fp32"]["semantic"]["mIoU"] == want["semantic"]["mIoU"]
    assert alone["disagreement"] == [] and alone["per_class"][0]["backends"]["onnx-fp32"]["pq"] == min(
        c["pq"] for c in want["panoptic"]["per_class"].values() if c["pq"] is not None
    )  # one backend: its worst class first

    shutil.copy(coco / "annotations" / "instances_val.json", coco / "annotations" / "instances_train.json")
    with pytest.raises(ValueError, match="several splits .*--split"):
        find_layout(coco)
    assert find_layout(coco, split="val").panoptic_json == coco / "annotations" / "panoptic_val.json"


def test_parse_spec_and_cli_errors(data, exports, tmp_path, capsys):
    assert parse_spec("int8=model.onnx@cuda:1") == ("int8", Path("model.onnx"), "cuda:1")
    assert parse_spec("dir/model.onnx") == (None, Path("dir/model.onnx"), None)
    odd = tmp_path / "a=b@cpu"
    odd.mkdir()
    assert parse_spec(str(odd)) == (None, odd, None)  # an existing path is taken as written

    assert main(["eval", "--data", str(data), "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    same = ["--model", f"x={exports['fp32']}", "--model", f"x={exports['int8']}"]
    assert main(["eval", "--data", str(data), *same]) == 2
    assert "labels repeat" in capsys.readouterr().err
    assert main(["eval", "--data", str(data), "--model", str(exports["fp32"]), "--onnx", str(exports["fp32"])]) == 2
    assert "--model" in capsys.readouterr().err
