"""``m2f batch`` on a local Ray (2 CPUs, started once for the module) with the demo model and `m2f synth` images.

The reference for every result is the service's own pipeline (decode, prepare, the same runner, answer) called
image by image in this process: the batch output must hold the same segments, RLEs and scores.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from m2f import bulk, bulk_io, cli, evaluate, metrics, synth
from pipeline import steps
from runtimes import TorchRunner

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before Ray is imported: no usage reports
import ray  # noqa: E402

# Ray Data reads its own deprecated settings when it copies its context; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

NUM_IMAGES = 10
BAD = {"zz_not_an_image.png": "UnsupportedImageFormat", "zz_truncated.png": "truncated"}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A synthetic dataset of 96x96 images; the input folder also holds two files that are not images."""
    root = tmp_path_factory.mktemp("batch") / "data"
    synth.write_dataset(root, NUM_IMAGES, seed=3, size=(96, 96))
    images = root / "images"
    (images / "zz_not_an_image.png").write_bytes(b"this is not an image")
    good = (images / "000001.png").read_bytes()
    (images / "zz_truncated.png").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def runner():
    """The reference runner, one intra-op thread (as the batch job's actor on 2 CPUs; and two threads on cores
    busy with Ray's processes wait for each other). The process's setting is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield TorchRunner(threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def logits(data, runner) -> dict[str, tuple]:
    """file name -> (prepared image, class logits, mask logits): the service's steps, one image at a time."""
    out = {}
    for path in sorted((data / "images").glob("0*.png")):
        prepared = steps.prepare(steps.decode(path.read_bytes()), runner.config)
        class_logits, mask_logits = runner.run(prepared.pixels[None])
        out[path.name] = (prepared, class_logits[0], mask_logits[0])
    return out


def reference(runner, logits, name: str, task: str) -> dict:
    prepared, class_logits, mask_logits = logits[name]
    return steps.answer(task, runner.config, prepared, class_logits, mask_logits)


def run(data: Path, out: Path, **kw) -> dict:
    kw = {"shard_size": 4, "progress": False, **kw}
    return bulk.run_batch(str(data / "images"), str(out), **kw)


def image_ids(out: Path) -> dict[str, int]:
    return {im["file_name"]: im["id"] for im in json.loads((out / "images.json").read_text())["images"]}


def parquet_rows(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted(out.glob("shard-*.parquet"))]
    return pa.concat_tables(tables).to_pylist()


def assert_same_segments(got: list[dict], want: list[dict]) -> None:
    keys = ("id", "category_id", "isthing", "area", "bbox")
    assert [{k: s[k] for k in keys} for s in got] == [{k: s[k] for k in keys} for s in want]
    assert [s["segmentation"] for s in got] == [s["segmentation"] for s in want]
    assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=1e-5)


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def panoptic_run(local_ray, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("panoptic") / "out"
    return out, run(data, out, task="panoptic", format="coco")


@pytest.fixture(scope="module")
def instance_runs(local_ray, data, tmp_path_factory):
    """Instance results as Parquet, interrupted twice: after one shard (--max-shards), and by losing a marker."""
    out = tmp_path_factory.mktemp("instance") / "out"
    first = run(data, out, task="instance", format="parquet", max_shards=1)
    assert not (out / "_SUCCESS").exists()
    second = run(data, out, task="instance", format="parquet")
    (out / "_shards" / "shard-00001.json").unlink()  # as if the job stopped after writing the shard's data
    third = run(data, out, task="instance", format="parquet")
    again = run(data, out, task="instance", format="parquet")
    return out, [first, second, third, again]


# ---------------------------------------------------------------------------------------------- results
def test_panoptic_coco_output_is_what_the_service_answers(panoptic_run, runner, logits):
    out, summary = panoptic_run
    ids = image_ids(out)
    annotations = {}
    for shard in sorted(out.glob("shard-*.json")):
        doc = json.loads(shard.read_text())
        assert {c["id"] for c in doc["categories"]} == set(runner.config.id2label)
        for ann in doc["annotations"]:
            assert ann["image_id"] not in annotations, "an image written twice"
            annotations[ann["image_id"]] = ann
    assert set(annotations) == {ids[name] for name in logits}  # every readable image once, in 3 shards
    assert len(list(out.glob("shard-*.json"))) == 3
    for name in logits:
        want = reference(runner, logits, name, "panoptic")
        ann = annotations[ids[name]]
        assert (ann["width"], ann["height"]) == (want["width"], want["height"]) == (96, 96)
        got = ann["segments_info"]
        keys = ("id", "category_id", "isthing", "area", "bbox")
        assert [{k: s[k] for k in keys} for s in got] == [{k: s[k] for k in keys} for s in want["segments"]]
        assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want["segments"]], abs=1e-5)
        id_map = np.asarray(Image.open(out / "panoptic" / ann["file_name"]).convert("RGB"), dtype=np.int64)
        id_map = id_map[..., 0] + 256 * id_map[..., 1] + 65536 * id_map[..., 2]
        expected = np.zeros((96, 96), np.int64)
        for s in want["segments"]:
            expected[mask_util.decode(s["segmentation"]).astype(bool)] = s["id"]
        assert np.array_equal(id_map, expected)
    assert summary["complete"] and summary["images"] == NUM_IMAGES + len(BAD)
    assert summary["this_run"]["images"] == NUM_IMAGES + len(BAD)
    assert summary["segments"] == sum(len(a["segments_info"]) for a in annotations.values())


def test_unreadable_images_are_listed_with_the_reason_and_the_job_finishes(panoptic_run):
    out, summary = panoptic_run
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["file_name"] for e in errors] == sorted(BAD)
    for e in errors:
        assert BAD[e["file_name"]] in e["error"]
        assert e["image_id"] == image_ids(out)[e["file_name"]]
    assert summary["errors"] == len(BAD)
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["images"], success["errors"], success["complete"]) == (NUM_IMAGES + len(BAD), len(BAD), True)
    markers = [json.loads(p.read_text()) for p in sorted((out / "_shards").glob("*.json"))]
    assert [m["images"] for m in markers] == [4, 4, 2]  # readable images per shard: the bad two are in the last
    assert [len(m["errors"]) for m in markers] == [0, 0, 2]


def test_an_interrupted_job_resumes_and_writes_every_image_once(instance_runs, logits):
    out, (first, second, third, again) = instance_runs
    assert (first["this_run"]["images"], first["shards_done"], first["complete"]) == (4, 1, False)
    assert (second["this_run"]["images"], second["this_run"]["skipped_shards"], second["complete"]) == (8, 1, True)
    assert (third["this_run"]["images"], third["this_run"]["shards"], third["complete"]) == (4, 1, True)
    assert (again["this_run"]["images"], again["this_run"]["shards"]) == (0, 0)  # nothing left: Ray not needed
    rows = parquet_rows(out)
    assert sorted(r["image_id"] for r in rows) == sorted(image_ids(out)[n] for n in logits)
    assert len(rows) == len({r["image_id"] for r in rows})
    assert len((out / "errors.jsonl").read_text().splitlines()) == len(BAD)


def test_instance_parquet_rows_are_what_the_service_answers(instance_runs, data, runner, logits):
    out, _ = instance_runs
    rows = {r["file_name"]: r for r in parquet_rows(out)}
    for name in logits:
        want = reference(runner, logits, name, "instance")
        row = rows[name]
        assert row["path"] == str(data / "images" / name)
        assert (row["width"], row["height"]) == (want["width"], want["height"])
        assert_same_segments(row["segments"], want["segments"])


def test_two_inference_actors_give_the_same_output_as_one(local_ray, data, instance_runs, tmp_path):
    out, _ = instance_runs
    summary = run(data, tmp_path / "out", task="instance", format="parquet", actors=2)
    assert summary["complete"] and summary["this_run"]["images"] == NUM_IMAGES + len(BAD)
    one = {r["image_id"]: r for r in parquet_rows(out)}
    two = {r["image_id"]: r for r in parquet_rows(tmp_path / "out")}
    assert sorted(one) == sorted(two)
    for image_id, row in one.items():
        assert_same_segments(two[image_id]["segments"], row["segments"])


def test_another_job_in_the_same_folder_is_refused(instance_runs, data):
    out, _ = instance_runs
    with pytest.raises(ValueError, match="holds another job.*shard_size 4 -> 5"):
        run(data, out, task="instance", format="parquet", shard_size=5)


@pytest.mark.parametrize("fmt", bulk_io.FORMATS)
def test_outputs_read_back_as_the_results_they_were_written_from(fmt, data, runner, logits, tmp_path):
    """The shard writers and the reader `m2f eval --predictions` uses, for every task, without Ray."""
    cfg, names = runner.config, sorted(logits)[:3]
    sources = [bulk_io.Source(str(data / "images" / n), n) for n in names]
    params = {"threshold": None, "overlap_mask_area_threshold": None, "max_instances": 100}
    for task in steps.TASKS:
        doc = bulk.job_doc("images", sources, None, "torch", cfg, task, fmt, 2, params)
        job = bulk.open_job(str(tmp_path / task), sources, doc, cfg)
        results = {}
        for shard in range(job.num_shards):
            records = []
            for i in job.shard_ids(shard):
                prepared, class_logits, mask_logits = logits[names[i]]
                answer = steps.answer(task, cfg, prepared, class_logits, mask_logits, png=fmt == "coco")
                png = answer.pop("png")
                if png:
                    job.folder.write(bulk_io.panoptic_png_name(i), base64.b64decode(png))
                records.append(bulk.image_record(job, i, answer))
                sizes = [prepared.resized_size], [prepared.original_size]
                results[i] = steps.postprocess(task, cfg, class_logits[None], mask_logits[None], *sizes)[0]
            bulk.write_shard(job, shard, records, [])
        bulk.finish(job, {"complete": True})
        predictions = bulk_io.Predictions(str(tmp_path / task))
        assert predictions.task == task and predictions.config.id2label == cfg.id2label
        for i, want in results.items():
            got = predictions.result(i)
            if task == "panoptic":
                assert np.array_equal(got.segmentation, want.segmentation)
                assert [(s.id, s.label_id) for s in got.segments] == [(s.id, s.label_id) for s in want.segments]
                assert [s.score for s in got.segments] == pytest.approx([s.score for s in want.segments], abs=1e-6)
            elif task == "instance":
                assert np.array_equal(got.masks, want.masks) and np.array_equal(got.labels, want.labels)
                assert got.scores.tolist() == pytest.approx(want.scores.tolist(), abs=1e-6)
            else:
                assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------- eval
def test_eval_scores_batch_output_as_it_scores_the_model(panoptic_run, instance_runs, data, runner):
    panoptic = evaluate.evaluate_predictions(panoptic_run[0], data)
    want = evaluate.evaluate(runner, data, "panoptic", progress=False)
    assert panoptic["num_images"] == want["num_images"] == NUM_IMAGES
    for split in ("all", "things", "stuff"):
        assert panoptic["metrics"][split] == pytest.approx(want["metrics"][split])
    instance = evaluate.evaluate_predictions(instance_runs[0], data, "instance")
    want = evaluate.evaluate(runner, data, "instance", progress=False)
    assert instance["metrics"]["num_predictions"] == want["metrics"]["num_predictions"] > 0
    for name in metrics.AP_NAMES:
        assert instance["metrics"][name] == pytest.approx(want["metrics"][name], abs=1e-6)
    with pytest.raises(ValueError, match="--task instance"):
        evaluate.evaluate_predictions(instance_runs[0], data, "panoptic")


def test_cli_batch_then_eval(local_ray, data, runner, tmp_path, capsys):
    out = tmp_path / "semantic"
    pattern = str(data / "images" / "00000[0-2].png")
    rc = cli.main(["batch", pattern, "-o", str(out), "--task", "semantic", "--shard-size", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "this run: 3 image(s) in 2 shard(s)" in printed and "complete (_SUCCESS)" in printed
    results = json.loads((out / "shard-00000.json").read_text()) + json.loads((out / "shard-00001.json").read_text())
    assert {r["image_id"] for r in results} == {0, 1, 2}
    assert all(set(r) == {"image_id", "category_id", "segmentation"} for r in results)
    rc = cli.main(
        ["eval", "--data", str(data), "--predictions", str(out), "--task", "semantic", "--limit", "3", "--json"]
    )
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    want = evaluate.evaluate(runner, data, "semantic", limit=3, progress=False)
    assert got["metrics"]["mIoU"] == pytest.approx(want["metrics"]["mIoU"])
    assert got["num_images"] == 3


# ---------------------------------------------------------------------------------------------- inputs and plan
def test_inputs_from_folders_globs_and_manifests(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ("a/2.png", "a/1.jpg", "a/sub/3.webp", "a/notes.txt", "a/sub/4.PNG"):
        (tmp_path / name).write_bytes(b"x")
    names = [s.file_name for s in bulk_io.list_inputs(str(tmp_path / "a"))]
    assert names == ["1.jpg", "2.png", "sub/3.webp", "sub/4.PNG"]  # recursive, images only, sorted
    assert [s.file_name for s in bulk_io.list_inputs(f"file://{tmp_path}/a")] == names
    assert [s.file_name for s in bulk_io.list_inputs(str(tmp_path / "a" / "*.png"))] == ["2.png"]
    assert [s.file_name for s in bulk_io.list_inputs(str(tmp_path / "a" / "**" / "*.png"))] == ["2.png"]
    assert [s.file_name for s in bulk_io.list_inputs(str(tmp_path / "a/**/[34].*"))] == ["sub/3.webp", "sub/4.PNG"]
    absolute = str(tmp_path / "a" / "1.jpg")
    (tmp_path / "list.txt").write_text(f"# images\na/2.png\n\n{absolute}\n")
    txt = bulk_io.list_inputs(str(tmp_path / "list.txt"))
    assert [(s.uri, s.file_name) for s in txt] == [(str(tmp_path / "a" / "2.png"), "a/2.png"), (absolute, absolute)]
    (tmp_path / "list.csv").write_text("id,path\n7,a/sub/3.webp\n8,a/2.png\n")
    assert [s.file_name for s in bulk_io.list_inputs(str(tmp_path / "list.csv"))] == ["a/sub/3.webp", "a/2.png"]
    pq.write_table(pa.table({"path": ["a/1.jpg", "a/2.png"]}), tmp_path / "list.parquet")
    parquet = bulk_io.list_inputs(str(tmp_path / "list.parquet"))
    assert [bulk_io.read_bytes(s.uri) for s in parquet] == [b"x", b"x"]
    assert bulk_io.listing_digest(parquet) != bulk_io.listing_digest(parquet[::-1])
    with pytest.raises(FileNotFoundError):
        bulk_io.list_inputs(str(tmp_path / "missing"))


def test_inputs_on_an_fsspec_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    fs.pipe({"/m2f-test/imgs/b.png": png.getvalue(), "/m2f-test/imgs/a/c.jpg": b"y", "/m2f-test/imgs/d.txt": b"z"})
    sources = bulk_io.list_inputs("memory://m2f-test/imgs")
    assert [(s.uri, s.file_name) for s in sources] == [
        ("memory://m2f-test/imgs/a/c.jpg", "a/c.jpg"),
        ("memory://m2f-test/imgs/b.png", "b.png"),
    ]
    assert bulk_io.read_bytes(sources[1].uri) == png.getvalue()
    fs.rm("/m2f-test", recursive=True)


def test_plan_from_the_machine():
    one = bulk.plan_resources("cpu", cluster_cpus=2, node_cpus=2, cluster_gpus=0)
    assert (one.actors, one.threads, one.batch_size, one.actor_cpus, one.actor_gpus) == (1, 1, 8, 1.0, 0.0)
    assert one.profile  # the actor picks its batch size up to 8 from its own timing
    assert not bulk.plan_resources("cpu", cluster_cpus=2, node_cpus=2, cluster_gpus=0, batch_size=4).profile
    two = bulk.plan_resources("cpu", cluster_cpus=2, node_cpus=2, cluster_gpus=0, actors=2)
    assert (two.actors, two.threads, two.actor_cpus) == (2, 1, 0.5)  # one CPU stays for decoding
    big = bulk.plan_resources("cpu", cluster_cpus=64, node_cpus=32, cluster_gpus=0)
    assert (big.actors, big.threads, big.actor_cpus) == (8, 7, 7.0)  # 4 per node of 32 cores, 4 cores spare
    assert bulk.plan_resources("cpu", cluster_cpus=8, node_cpus=8, cluster_gpus=0, threads=8).actor_cpus == 7.0
    assert bulk.plan_resources("cpu", cluster_cpus=1, node_cpus=1, cluster_gpus=0).actor_cpus == 0.0
    gpu = bulk.plan_resources("cuda", cluster_cpus=16, node_cpus=16, cluster_gpus=2)
    assert (gpu.actors, gpu.actor_gpus, gpu.batch_size, gpu.actor_cpus) == (2, 1.0, 8, 1.0)
    with pytest.raises(ValueError, match="no GPU"):
        bulk.plan_resources("cuda", cluster_cpus=4, node_cpus=4, cluster_gpus=0)


def test_actors_choose_their_batch_size_from_their_own_timing(monkeypatch):
    timed = []

    def profile(run, size, max_batch_size):  # seconds per pass, two rounds: batches of 2 pay, 4 and 8 do not
        timed.append((size, max_batch_size))
        return {1: [1.0, 1.1], 2: [1.6, 1.7], 4: [3.5, 3.6], 8: [7.5, 7.4]}

    monkeypatch.setattr(bulk, "profile_batches", profile)
    chosen = bulk.Infer(None, "torch", "cpu", 1, batch_size=8, bucket_px=128, profile=True)
    assert chosen.policy.max_batch_size == 2 and timed == [((160, 224), 8)]  # a 4:3 photo at the demo's 160 px
    fixed = bulk.Infer(None, "torch", "cpu", 1, batch_size=8, bucket_px=128, profile=False)
    assert fixed.policy.max_batch_size == 8 and len(timed) == 1
