"""What the benchmark scripts share (the scripts themselves never import one another).

- the machine: :func:`machine_info`;
- inputs: :func:`parse_size` (``"WxH"`` -> (W, H), as photos are named), :func:`photos` (scikit-image's samples);
- the service_vs_naive checkpoint: :class:`Setting` (:func:`full_setting`, :func:`tiny_setting`),
  :func:`checkpoint_folder`, :func:`build_checkpoint` (shaped random weights, :func:`shape_outputs_`), and its
  fp32 and int8 exports (:func:`int8_exports`);
- the server: :func:`free_port`, :class:`Server` (``m2f serve`` in a subprocess on 127.0.0.1);
- load: :func:`closed_loop` (HTTP clients in this process), :func:`closed_loop_elsewhere` (the same in a child
  process, ``bench/loadgen.py``, at a lower priority), :func:`percentiles` of latencies;
- ``transformers``' post-processing, as ``bench/naive_server.py`` serves it: :func:`hf_postprocess`,
  :func:`segments_json` (COCO RLE through pycocotools, :func:`rle`).

Importing this module imports no torch, transformers or scikit-image: the functions that need them import them
when called, so that light scripts (``bench/burst.py``, ``bench/soak.py``, the ``bench/loadgen.py`` child) start
fast and run without them.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pickle
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from model_format.metadata import read_metadata, write_metadata
from pipeline.config import PreprocessConfig, preprocess_to_hf
from pipeline.label_sets import LABEL_SETS
from service.client import retry_after_s

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
DECODER_UPDATE_SCALE = 0.1  # shaping of the random weights (see shape_outputs_)
CLASS_SCALE = 4.0


# ---------------------------------------------------------------------------------------------- the machine
def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core counts, torch / transformers / Python versions, ``threads`` (as the caller ran) and the
    UTC time: the header of every report."""
    import torch  # lazy: torch, its version (light scripts import this module without it)
    import transformers  # lazy: transformers (a development dependency), its version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------------------------------- inputs
def parse_size(text: str) -> tuple[int, int]:
    """A command-line size, width first as photos are named (and as PIL takes it): ``"640x480"`` -> (640, 480),
    i.e. (W, H); ``"512"`` -> (512, 512). An ``argparse`` type: a bad size is an ``ArgumentTypeError``."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        w = h = 0
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH (e.g. 640x480)")
    return w, h


def photos(size: tuple[int, int], names: tuple[str, ...] = PHOTOS) -> list[bytes]:
    """scikit-image's sample photographs resized to ``size`` (W, H), as JPEG bytes (quality 90)."""
    try:
        from skimage import data  # lazy: scikit-image (a bench-only dependency), only for the photos
    except ImportError:
        raise SystemExit("the photos come from scikit-image: pip install scikit-image") from None
    out = []
    for name in names:
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------------------------------------- the checkpoint
@dataclass(frozen=True)
class Setting:
    """The model and inputs of a run: the full one, or the tiny smoke test."""

    name: str
    arch: dict[str, Any]  # mask2former.reference's architecture dict
    labels: tuple[str, ...]
    thing_ids: frozenset[int]
    shortest_edge: int  # the resize of preprocessor_config.json, in pixels
    longest_edge: int


def full_setting() -> Setting:
    """swin-tiny COCO panoptic (133 classes with their COCO names, 100 queries), resize 384 / 640."""
    from mask2former.reference import architecture  # lazy: mask2former.reference imports torch

    coco = LABEL_SETS["coco-panoptic"]
    return Setting(
        "swin-tiny-coco-panoptic", architecture("tiny", "coco-panoptic"), coco.labels, coco.thing_ids, 384, 640
    )


def tiny_setting() -> Setting:
    """The tests' tiny architecture (5 classes: 2 things, 3 stuff), resize 128 / 160: a smoke run."""
    from mask2former.reference import TINY  # lazy: mask2former.reference imports torch

    return Setting("tiny", TINY, ("person", "car", "sky", "road", "grass"), frozenset({0, 1}), 128, 160)


def shape_outputs_(model: Any) -> None:
    """Give a random ``Mask2FormerForUniversalSegmentation`` distinct queries and spread-out scores, in place:
    each decoder layer's residual updates (attention output projections, second FFN layer) scaled by
    ``DECODER_UPDATE_SCALE`` so that the queries stay distinct, the class head by ``CLASS_SCALE`` so that
    their scores spread over (0, 1). Shapes, and so the compute, are unchanged."""
    import torch  # lazy: torch, to edit the weights

    with torch.no_grad():
        for layer in model.model.transformer_module.decoder.layers:
            for linear in (layer.self_attn.out_proj, layer.cross_attn.out_proj, layer.fc2):
                linear.weight.mul_(DECODER_UPDATE_SCALE)
                linear.bias.mul_(DECODER_UPDATE_SCALE)
        model.class_predictor.weight.mul_(CLASS_SCALE)
        model.class_predictor.bias.mul_(CLASS_SCALE)


def checkpoint_folder(workdir: Path, setting: Setting, seed: int) -> Path:
    """Where the checkpoint of ``setting`` and its exports live (the name says what they are)."""
    shaping = f"u{DECODER_UPDATE_SCALE:g}-c{CLASS_SCALE:g}"
    return workdir / f"{setting.name}-seed{seed}-{setting.shortest_edge}-{setting.longest_edge}-{shaping}"


def build_checkpoint(setting: Setting, folder: Path, seed: int) -> Path:
    """A shaped random-weight HF checkpoint (with ``thing_ids`` and the resize) in ``folder``, unless there."""
    if (folder / "preprocessor_config.json").is_file():
        return folder
    from transformers.utils import logging as hf_logging  # lazy: transformers (development), to build it

    from mask2former.reference import hf_model  # lazy: transformers and torch

    partial = folder.with_name(folder.name + ".partial")
    hf_logging.disable_progress_bar()
    model = hf_model(setting.arch, seed, id2label=dict(enumerate(setting.labels)))
    shape_outputs_(model)
    model.save_pretrained(partial)
    config = json.loads((partial / "config.json").read_text())
    config["thing_ids"] = sorted(setting.thing_ids)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    pre = PreprocessConfig(shortest_edge=setting.shortest_edge, longest_edge=setting.longest_edge)
    (partial / "preprocessor_config.json").write_text(json.dumps(preprocess_to_hf(pre), indent=2) + "\n")
    partial.rename(folder)
    return folder


def int8_exports(folder: Path, work: Path, size: int, name: str = "swin-tiny") -> dict[str, Path]:
    """The checkpoint ``folder`` exported at ``size`` x ``size`` (fixed size, batch 1, unchecked) into ``work``, unless
    there: "fp32"; "int8" as ``m2f export onnx --quantize int8`` writes it (mixed precision:
    ``model_export.int8.FLOAT_MODULES`` stay float32); and "int8-all", every MatMul int8 (the exporter before
    issue 32), for comparison."""
    from model_export.graph import save  # lazy: torch (the exporter)
    from model_export.int8 import prepare, quantize_export, quantize_prepared  # lazy: torch (the exporter)
    from model_export.onnx import export_onnx  # lazy: torch (the exporter)

    fp32 = work / f"{name}-{size}.onnx"
    if not fp32.is_file():
        export_onnx(folder, fp32, height=size, width=size, check=False, log=None)
    mixed, every = work / f"{name}-{size}-int8.onnx", work / f"{name}-{size}-int8-all.onnx"
    if not mixed.is_file():
        shutil.copy(fp32, mixed)
        quantize_export(mixed)
    if not every.is_file():
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            proto = quantize_prepared(prepare(fp32, Path(tmp) / fp32.name), [])
        meta = read_metadata(mixed)
        write_metadata(
            proto, type(meta)(**{**meta.__dict__, "quantization_info": {**meta.quantization_info, "float_matmuls": 0}})
        )
        save(proto, every)
    return {"fp32": fp32, "int8": mixed, "int8-all": every}


# ---------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``m2f serve`` on a free port, from ``source`` (this checkout, or another one to compare with), ready once
    ``/readyz`` answers 200. ``batch``: ``--max-batch-size`` (None: the server's default, a start-up profile up
    to 4); ``delay_ms``: ``--max-batch-delay-ms``; ``env``: added to this process's environment."""

    def __init__(
        self,
        model: str | None,
        batch: int | None,
        delay_ms: float,
        env: dict[str, str] | None = None,
        source: Path = REPO,
    ):
        self.port = free_port()
        cmd = [sys.executable, "-m", "m2f.cli", "serve", "--port", str(self.port), "--log-level", "warning"]
        cmd += ["--max-batch-delay-ms", str(delay_ms)] + ([] if batch is None else ["--max-batch-size", str(batch)])
        if model:
            cmd += ["--model", model]
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(source)}
        self.proc = subprocess.Popen(cmd, cwd=source, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("server exited")
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def batch_sizes(self) -> tuple[float, float]:
        """The server's ``m2f_batch_size`` histogram: (sum of batch sizes, count of batches) so far."""
        text = httpx.get(self.base + "/metrics").text
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("m2f_batch_size_"))
        return float(values.get("m2f_batch_size_sum", 0)), float(values.get("m2f_batch_size_count", 0))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


# ---------------------------------------------------------------------------------------------- load
def percentiles(latencies: list[float]) -> dict[str, float]:
    """Latencies in seconds -> their p50 / p95 / p99 in ms."""
    q = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": float(q[0]), "p95_ms": float(q[1]), "p99_ms": float(q[2])}


def closed_loop(
    base: str,
    data: list[bytes],
    concurrency: int,
    seconds: float,
    params: dict[str, Any],
    raw: bool = False,
    path: str = "/v1/segment",
) -> dict[str, Any]:
    """``concurrency`` clients (threads, one httpx connection each), each sending the next photo (JPEG bytes of
    ``data``) to ``POST {base}{path}`` as soon as its answer is in, for ``seconds``; ``params``: the query
    parameters; ``raw``: the JPEG as the body, else the multipart field ``image``.

    Clients behave as ``service.client.Client`` does: a 503 with ``Retry-After`` (the server refused the request
    before doing any work: its queue would not be answered in time) is counted as ``refused`` and the same photo
    is sent again after that many seconds; the latency of a request runs from its first send to its 200. Any
    other failure is an error and the client moves on. Returns ``wall_s``, ``latencies`` (s, one per 200),
    ``segments`` (per 200), ``errors`` and ``refused``."""
    latencies: list[float] = []
    segments: list[int] = []
    errors = refused = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        nonlocal errors, refused
        with httpx.Client(base_url=base, timeout=300) as c:
            i = k
            while time.monotonic() < stop_at:
                photo = data[i % len(data)]
                body = {"content": photo, "headers": {"Content-Type": "image/jpeg"}} if raw else {}
                files = None if raw else {"image": ("photo.jpg", photo, "image/jpeg")}
                t0 = time.perf_counter()
                n = None
                while time.monotonic() < stop_at:
                    try:
                        r = c.post(path, params=params, files=files, **body)
                        wait = retry_after_s(r) if r.status_code == 503 else None
                        if wait is None:
                            n = len(r.json()["segments"]) if r.status_code == 200 else None
                            break
                    except (httpx.HTTPError, ValueError, KeyError):
                        break
                    with lock:
                        refused += 1
                    time.sleep(max(0.0, min(wait, stop_at - time.monotonic())))
                else:
                    break  # time is up while waiting to retry: not an answer, not an error
                dt = time.perf_counter() - t0
                with lock:
                    if n is None:
                        errors += 1
                    else:
                        latencies.append(dt)
                        segments.append(n)
                i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "wall_s": time.perf_counter() - t0,
        "latencies": latencies,
        "segments": segments,
        "errors": errors,
        "refused": refused,
    }


def closed_loop_elsewhere(
    base: str,
    data: list[bytes],
    concurrency: int,
    seconds: float,
    params: dict[str, Any],
    nice: int = 19,
    raw: bool = False,
) -> dict[str, Any]:
    """:func:`closed_loop` in a child process (``python bench/loadgen.py REQUEST.pickle``) whose niceness is
    raised by ``nice`` (0: same priority as this one), so that the kernel gives the server the cores whenever
    both want them, as clients on another host would. Same arguments and result; the child's start-up (under a
    second: it imports no torch) is not part of ``wall_s``."""
    with tempfile.TemporaryDirectory(prefix="m2f-loadgen-") as tmp:
        request = Path(tmp) / "request.pickle"
        request.write_bytes(
            pickle.dumps(
                {
                    "base": base,
                    "data": data,
                    "concurrency": concurrency,
                    "seconds": seconds,
                    "params": params,
                    "raw": raw,
                }
            )
        )
        out = subprocess.run(
            [sys.executable, str(BENCH / "loadgen.py"), str(request)],
            check=True,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------------------- HF post-processing
def rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool mask -> COCO RLE with ``counts`` as a str."""
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def hf_postprocess(
    processor: Any,
    outputs: Any,
    target_size: tuple[int, int],
    task: str,
    threshold: float,
    overlap_mask_area_threshold: float,
    stuff_ids: set[int],
) -> tuple[torch.Tensor | None, list[dict[str, Any]]]:
    """HF post-processing of one image's outputs (``target_size``: (H, W) of the original image): (panoptic id
    map (H, W) or instance masks (N, H, W) or None, segments_info). ``processor``: a
    ``Mask2FormerImageProcessor``; ``outputs`` needs ``class_queries_logits`` and ``masks_queries_logits``."""
    if task == "panoptic":
        result = processor.post_process_panoptic_segmentation(
            outputs,
            threshold=threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            label_ids_to_fuse=stuff_ids,
            target_sizes=[target_size],
        )[0]
    elif task == "instance":
        result = processor.post_process_instance_segmentation(
            outputs,
            threshold=threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            target_sizes=[target_size],
            return_binary_maps=True,
        )[0]
    else:
        raise ValueError(f"task {task!r}: this server does panoptic and instance only")
    return result["segmentation"], result["segments_info"]


def segments_json(
    task: str, segmentation: torch.Tensor | None, segments_info: list[dict[str, Any]], id2label: dict[int, str]
) -> list[dict[str, Any]]:
    """One JSON record per segment with its mask as COCO RLE. Panoptic: the mask is ``segmentation == id``;
    a fused stuff class appears once (HF lists it once per query it merged). Instance: the i-th binary map."""
    records, seen = [], set()
    for i, info in enumerate(segments_info):
        if info["id"] in seen:
            continue
        seen.add(info["id"])
        mask = segmentation == info["id"] if task == "panoptic" else segmentation[i] > 0  # (H, W)
        label = int(info["label_id"])
        records.append(
            {
                "id": int(info["id"]),
                "label_id": label,
                "label": id2label.get(label, str(label)),
                "score": float(info["score"]),
                "segmentation": rle(mask.numpy()),
            }
        )
    return records
