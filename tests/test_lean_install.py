"""The lean install: ``pip install ".[serve]" && m2f serve`` serves the demo model without torch.

- ``weights/demo/model.onnx`` (shipped, written by ``weights/export_demo_onnx.py``) belongs to the checkpoint
  next to it: its metadata names the checkpoint's SHA-256 and carries the same config, and it computes what
  PyTorch computes from ``model.safetensors``. The slow test re-exports and compares with the shipped file.
- In a process where ``import torch`` fails, the CLI and the service import, ``m2f serve`` with no ``--model``
  serves that file through ONNX Runtime and answers ``/v1/segment``; the client needs neither torch nor FastAPI.
- The README's first command line is the lean install, and ``.ci/run`` still finds the test command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2f import synth
from service.settings import DEMO_DIR, Settings, demo_onnx

REPO = Path(__file__).resolve().parents[1]
DEMO_ONNX = DEMO_DIR / "model.onnx"
SAMPLE = DEMO_DIR / "sample.png"
# ONNX Runtime vs PyTorch on the shipped graph: max |diff| <= PARITY x max |PyTorch output| per output
# (measured when exported: 6.1e-7 on mask logits; the exporter's own bound is 1e-4).
PARITY = 1e-5
# The shipped graph vs a fresh export, both in ONNX Runtime (the same exporter and weights: identical
# graphs; the bound allows for another onnxscript's graph rewrites reordering float operations).
FRESH = 1e-6

# Imported first by every Python process that has this folder on PYTHONPATH: `import torch` fails there.
NO_TORCH = "import sys\nsys.modules['torch'] = None  # import torch raises ImportError\n"
# ... and neither can the server's packages: what the client may not need.
NO_SERVER = NO_TORCH + "".join(
    f"sys.modules[{m!r}] = None\n"
    for m in ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "prometheus_client", "onnxruntime")
)


def blocker(tmp_path: Path, text: str) -> dict[str, str]:
    """The environment of a Python whose ``sitecustomize`` blocks modules as ``text`` says."""
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(text)
    return {"PYTHONPATH": str(folder)}


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def run_graph(path: Path, pixels: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixels})


def check_inputs() -> list[np.ndarray]:
    """Batch 1 at the demo's size and batch 2 at another (both dynamic axes), random normal pixels."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(np.float32) for shape in ((1, 3, 160, 160), (2, 3, 128, 192))]


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------- the file
def test_shipped_onnx_metadata_matches_the_checkpoint():
    from model_format.metadata import checkpoint_sha256, read_metadata
    from pipeline.config import read_config

    meta = read_metadata(DEMO_ONNX)
    digest, files = checkpoint_sha256(DEMO_DIR)
    assert meta.source_sha256 == digest, "weights/demo changed: run python weights/export_demo_onnx.py"
    assert meta.source_files == files and meta.source == "weights/demo"
    assert meta.to_config() == read_config(DEMO_DIR)  # labels, thing ids, thresholds, preprocessing, architecture
    assert meta.dtype == "float32" and meta.quantization == ""
    assert meta.input_shape == ("batch", 3, "height", "width")
    assert meta.check["max_rel_diff"] <= PARITY


def test_shipped_onnx_computes_what_pytorch_computes():
    torch = pytest.importorskip("torch")
    from mask2former import load_model

    model = load_model(DEMO_DIR).eval()
    for pixels in check_inputs():
        with torch.inference_mode():
            out = model(torch.from_numpy(pixels))
        ref = (out.class_logits.numpy(), out.mask_logits.numpy())
        got = run_graph(DEMO_ONNX, pixels)
        for name, a, b in zip(("class_logits", "mask_logits"), got, ref):
            assert a.shape == b.shape
            assert rel_diff(a, b) <= PARITY, f"{name} {pixels.shape}: {rel_diff(a, b):.2e}"


@pytest.mark.slow
def test_fresh_export_equals_the_shipped_file(tmp_path):
    """A fresh export of ``weights/demo`` (minutes on 2 cores) gives the shipped graph's outputs."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "weights"))
    try:
        from export_demo_onnx import export_demo
    finally:
        sys.path.pop(0)

    fresh = export_demo(tmp_path / "fresh.onnx", log=None)
    for pixels in check_inputs():
        for name, a, b in zip(("class_logits", "mask_logits"), run_graph(fresh, pixels), run_graph(DEMO_ONNX, pixels)):
            assert rel_diff(a, b) <= FRESH, f"{name} {pixels.shape}: {rel_diff(a, b):.2e}"


def test_sample_image_is_a_synth_output():
    """``weights/demo/sample.png`` is image 4 of ``m2f synth --seed 7 --size 240 320``."""
    sample = np.asarray(Image.open(SAMPLE).convert("RGB"))
    assert np.array_equal(sample, synth.make_sample(seed=7, index=4, size=(240, 320)).image)


# ---------------------------------------------------------------------------------------------- without torch
def test_the_blocker_blocks(tmp_path):
    """The environment the tests below use really has no torch (else they would prove nothing)."""
    r = run_python("import torch", blocker(tmp_path, NO_TORCH))
    assert r.returncode != 0 and "import of torch halted" in r.stderr


def test_cli_service_and_settings_import_without_torch(tmp_path):
    code = (
        "import m2f.cli, service.app, service.server, service.client, runtimes.onnx_runner, runtimes.ort_session\n"
        "from service.settings import Settings\n"
        "s = Settings()\n"
        "print(s.runtime, s.model)\n"
        "m2f.cli.build_parser().parse_args(['serve', '--log-format', 'json'])\n"
    )
    r = run_python(code, blocker(tmp_path, NO_TORCH))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["onnxruntime", str(demo_onnx())]
    r = run_python("import sys\nfrom m2f.cli import main\nsys.exit(main(['serve', '--help']))", {})
    assert r.returncode == 0 and "--log-format" in r.stdout


def test_client_imports_without_torch_or_the_server_packages(tmp_path):
    code = (
        "import numpy as np\n"
        "from pycocotools import mask as m\n"
        "from service.client import Segment\n"
        "mask = np.zeros((5, 7), np.uint8); mask[1:3, 2:6] = 1\n"
        "rle = m.encode(np.asfortranarray(mask)); rle['counts'] = rle['counts'].decode()\n"
        "s = Segment(1, 'x', 0, 0.5, 8, (2, 1, 4, 2), True, rle)\n"
        "assert (s.mask == mask.astype(bool)).all()\n"
    )
    r = run_python(code, blocker(tmp_path, NO_SERVER))
    assert r.returncode == 0, r.stderr


def test_settings_choose_the_runtime_for_the_demo():
    pytest.importorskip("torch")
    assert (DEMO_DIR / "model.safetensors").is_file()
    default = Settings()
    assert (default.model, default.runtime) == (None, "torch")  # as before when torch is there
    ort = Settings(model=DEMO_ONNX)  # the runtime follows the file
    assert (ort.model, ort.runtime) == (str(DEMO_ONNX), "onnxruntime")


def test_serve_without_torch_answers_from_the_onnx_demo(start_server, tmp_path):
    """`m2f serve` with no --model, in a process where torch cannot be imported: the ONNX demo through ONNX
    Runtime, whose answer for the sample image agrees with PyTorch's in this process."""
    torch = pytest.importorskip("torch")
    from m2f.cli import segment_image
    from mask2former import load_model
    from service.client import Client

    server = start_server("--max-batch-delay-ms", "1", env=blocker(tmp_path, NO_TORCH))
    with Client(server.base) as client:
        info = client.model_info()
        assert (info.model, info.runtime) == ("mask2former-demo-synth", "onnxruntime")
        assert Path(info.raw["runner"]["path"]) == DEMO_ONNX
        result = client.segment(SAMPLE, task="panoptic")
    with torch.inference_mode():
        ref = segment_image(load_model(DEMO_DIR), Image.open(SAMPLE).convert("RGB"), "panoptic")
    assert [s.category_id for s in result.segments] == [s["category_id"] for s in ref["segments"]]
    assert [s.score for s in result.segments] == pytest.approx([s["score"] for s in ref["segments"]], abs=1e-4)
    for got, want in zip(result.segments, ref["segments"]):
        assert got.area == pytest.approx(want["area"], rel=1e-3)  # a boundary pixel may move (logits ~1e-6 apart)
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------------------------------------- README
def test_readme_first_line_is_the_lean_install_and_ci_finds_the_tests():
    text = (REPO / "README.md").read_text()
    block = re.search(r"^```\n(.*?)^```", text, flags=re.M | re.S).group(1)
    first = block.splitlines()[0]
    assert first.startswith('pip install ".[serve]" && m2f serve'), first
    assert "torch" not in first.split("#")[0]
    ci = (REPO / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '([^']+)' README.md", ci).group(1)
    found = [line for line in text.splitlines() if re.search(pattern, line)]
    assert found and found[0].startswith("python -m pytest")
