"""Files of ``m2f batch`` (:mod:`m2f.bulk`): input listing, output shards, and reading them back.

Paths are local paths or URIs of any filesystem pyarrow opens (``s3://``, ``gs://``, ``hdfs://``) or, failing
that, fsspec (``memory://``, ``az://``, ... when its package is installed). pyarrow comes with Ray Data, an
optional heavy dependency (the ``batch`` extra), so it is imported where used.

Output folder layout (one job per folder)::

    _job.json                  what the job is: inputs digest, model, task, format, shard size, labels
    images.json                {"images": [{"id", "file_name", "path"}]}: image ids are positions in the listing
    shard-00000.json           coco: instance/semantic results list, or panoptic {"annotations", "categories"}
    shard-00000.parquet        parquet: one row per image, its segments with COCO RLE
    panoptic/000000000007.png  coco panoptic: the id map (id = R + 256 G + 256^2 B), named by image id
    _shards/shard-00000.json   a finished shard's marker: counts and the images that could not be read
    errors.jsonl               every image that could not be read, with the reason (at the end)
    _SUCCESS                   the job's summary, written once every shard is finished
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from pipeline.config import Mask2FormerConfig
from pipeline.postprocess import InstanceResult, PanopticResult, Segment

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
FORMATS = ("coco", "parquet")
ERRORS = "errors.jsonl"
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """One input image: where to read it, and its name relative to the input (folder, glob root or manifest)."""

    uri: str
    file_name: str


# ---------------------------------------------------------------------------------------------- filesystems
def has_scheme(path: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


PYARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs")  # pyarrow's own remote filesystems; others: fsspec


@functools.lru_cache(maxsize=32)
def _filesystem_of(root: str):
    """One filesystem per scheme and bucket or host (an S3 one looks up the bucket's region once)."""
    from pyarrow import fs  # lazy: pyarrow (the batch extra)

    if root.split("://", 1)[0] in PYARROW_SCHEMES:
        return fs.FileSystem.from_uri(root)[0]
    import fsspec  # lazy: fsspec (other filesystems; optional)

    return fs.PyFileSystem(fs.FSSpecHandler(fsspec.core.url_to_fs(root)[0]))


def filesystem(uri: str):
    """A local path or URI -> (pyarrow filesystem, path on it)."""
    from pyarrow import fs  # lazy: pyarrow (the batch extra)

    if not has_scheme(uri):
        return fs.LocalFileSystem(), os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return fs.LocalFileSystem(), "/" + urlparse(uri).path.lstrip("/")
    fsys = _filesystem_of(f"{scheme}://{rest.split('/', 1)[0]}")
    if scheme not in PYARROW_SCHEMES:
        return fsys, fsys.handler.fs._strip_protocol(uri)
    if scheme in ("s3", "gs", "gcs"):
        return fsys, rest  # bucket/key
    return fsys, "/" + urlparse(uri).path.lstrip("/")


def read_bytes(uri: str) -> bytes:
    fsys, path = filesystem(uri)
    with fsys.open_input_stream(path) as f:
        return f.read()


def _child_uri(root_uri: str, root_path: str, path: str) -> str:
    rel = path[len(root_path) :].lstrip("/")
    return root_uri.rstrip("/") + "/" + rel if rel else root_uri


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------------- inputs
def list_inputs(spec: str) -> list[Source]:
    """The images of ``spec``: a folder (recursive), a glob (``**`` crosses folders), a manifest (.txt lines,
    .csv or .parquet with a ``path`` column, else the first column; relative entries are relative to the
    manifest's folder) or one image file. Folders and globs are sorted by path; manifests keep their order."""
    from pyarrow import fs  # lazy: pyarrow (the batch extra)

    if _GLOB_CHARS.search(spec):
        return _list_glob(spec)
    uri = spec if has_scheme(spec) else os.path.abspath(spec)
    fsys, path = filesystem(uri)
    info = fsys.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(f"no such folder, manifest or image: {spec}")
    if info.type == fs.FileType.Directory:
        return _list_folder(uri)
    if path.lower().endswith(MANIFEST_SUFFIXES):
        return _read_manifest(uri)
    if _is_image(path):
        return [Source(uri, path.rsplit("/", 1)[-1])]
    raise ValueError(f"{spec}: not a folder, a manifest ({', '.join(MANIFEST_SUFFIXES)}) or an image file")


def _list_folder(root_uri: str, pattern: re.Pattern[str] | None = None, recursive: bool = True) -> list[Source]:
    """Images under a folder, or its files whose relative path matches ``pattern``, sorted by that path."""
    from pyarrow import fs  # lazy: pyarrow (the batch extra)

    fsys, root = filesystem(root_uri)
    infos = fsys.get_file_info(fs.FileSelector(root, recursive=recursive))
    out = []
    for info in infos:
        if info.type != fs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        if pattern is None and not _is_image(rel):
            continue
        if pattern is not None and not pattern.fullmatch(rel):
            continue
        out.append(Source(_child_uri(root_uri, root, info.path), rel))
    return sorted(out, key=lambda s: s.file_name)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob -> regex: ``*`` and ``?`` stay within a folder, ``**/`` matches any folders (or none)."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", pattern)
    out = []
    for p in parts:
        if p == "**/":
            out.append("(?:.*/)?")
        elif p == "**":
            out.append(".*")
        elif p == "*":
            out.append("[^/]*")
        elif p == "?":
            out.append("[^/]")
        elif p.startswith("[") and p.endswith("]") and len(p) > 2:
            out.append(fnmatch.translate(p)[4:-3])  # fnmatch's own translation of the class
        else:
            out.append(re.escape(p))
    return re.compile("".join(out))


def _list_glob(spec: str) -> list[Source]:
    """Files matching a glob; names are relative to the folder before the first wildcard."""
    head = spec[: _GLOB_CHARS.search(spec).start()]
    root = head.rsplit("/", 1)[0] if "/" in head else "."
    rest = spec[len(root) :].lstrip("/") if "/" in head else spec
    root_uri = root if has_scheme(root) else os.path.abspath(root)
    return _list_folder(root_uri, _glob_regex(rest), recursive="/" in rest or "**" in rest)


def _manifest_entries(data: bytes, suffix: str) -> list[str]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: pyarrow (the batch extra)

        table = pq.read_table(io.BytesIO(data))
        name = "path" if "path" in table.column_names else table.column_names[0]
        return [str(v) for v in table.column(name).to_pylist() if v]
    text = data.decode("utf-8-sig")
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    column = 0
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        column = [c.strip().lower() for c in rows[0]].index("path")
        rows = rows[1:]
    return [r[column].strip() for r in rows if len(r) > column and r[column].strip()]


def _read_manifest(uri: str) -> list[Source]:
    entries = _manifest_entries(read_bytes(uri), "." + uri.rsplit(".", 1)[-1].lower())
    base = uri.rsplit("/", 1)[0]
    out = []
    for e in entries:
        if has_scheme(e) or e.startswith("/"):
            out.append(Source(e, e))
        else:
            out.append(Source(f"{base}/{e}", e))
    return out


def listing_digest(sources: Iterable[Source]) -> str:
    """sha256 of the ordered list of inputs: a job resumes only over the same images in the same order."""
    h = hashlib.sha256()
    for s in sources:
        h.update(s.uri.encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- output folder
class Folder:
    """A job's output folder on any filesystem; every file is written whole (a temporary name, then moved)."""

    def __init__(self, uri: str):
        self.uri = uri if has_scheme(uri) else os.path.abspath(uri)
        self.fs, self.root = filesystem(self.uri)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        from pyarrow import fs  # lazy: pyarrow (the batch extra)

        return self.fs.get_file_info(self.path(name)).type != fs.FileType.NotFound

    def write(self, name: str, data: bytes) -> None:
        final = self.path(name)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = f"{final}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def write_json(self, name: str, obj: Any) -> None:
        self.write(name, (json.dumps(obj, separators=(",", ":")) + "\n").encode())

    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read(name))

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    def names(self, folder: str) -> list[str]:
        """File names directly in ``folder`` (relative to the root), sorted; [] when it does not exist."""
        from pyarrow import fs  # lazy: pyarrow (the batch extra)

        infos = self.fs.get_file_info(fs.FileSelector(self.path(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.File and ".tmp-" not in i.base_name)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def panoptic_png_name(image_id: int) -> str:
    return f"panoptic/{image_id:012d}.png"


def job_config(job: dict[str, Any]) -> Mask2FormerConfig:
    """The model config (labels, things) a job ran with, from its ``_job.json``."""
    return replace(Mask2FormerConfig.from_hf_dict(job["config"]), name=job["model_name"])


# ---------------------------------------------------------------------------------------------- shard files
def coco_shard(task: str, records: list[dict[str, Any]], config: Mask2FormerConfig) -> Any:
    """The COCO results of one shard's records (``image_id`` plus the service's answer): a results list
    (instance: with scores and boxes; semantic: one RLE per class present), or panoptic annotations."""
    if task == "panoptic":
        annotations = [
            {
                "image_id": r["image_id"],
                "file_name": panoptic_png_name(r["image_id"]).split("/", 1)[1],
                "width": r["width"],
                "height": r["height"],
                "segments_info": [
                    {k: s[k] for k in ("id", "category_id", "bbox", "area", "score", "isthing", "label")}
                    | {"iscrowd": 0}
                    for s in r["segments"]
                ],
            }
            for r in records
        ]
        categories = [
            {"id": i, "name": n, "isthing": int(i in config.thing_ids)} for i, n in sorted(config.id2label.items())
        ]
        return {"annotations": annotations, "categories": categories}
    keys = ("category_id", "segmentation", "score", "bbox") if task == "instance" else ("category_id", "segmentation")
    return [{"image_id": r["image_id"], **{k: s[k] for k in keys}} for r in records for s in r["segments"]]


def parquet_schema():
    import pyarrow as pa  # lazy: pyarrow (the batch extra)

    segment = pa.struct(
        [
            ("id", pa.int64()),
            ("category_id", pa.int64()),
            ("label", pa.string()),
            ("isthing", pa.bool_()),
            ("score", pa.float64()),  # null for semantic segments
            ("area", pa.int64()),
            ("bbox", pa.list_(pa.int64())),  # [x, y, w, h]
            ("segmentation", pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])),  # COCO RLE
        ]
    )
    fields = [("image_id", pa.int64()), ("file_name", pa.string()), ("path", pa.string())]
    fields += [("width", pa.int64()), ("height", pa.int64()), ("segments", pa.list_(segment))]
    return pa.schema(fields)


def parquet_shard(records: list[dict[str, Any]]) -> bytes:
    """One shard's records as Parquet bytes: one row per image."""
    import pyarrow as pa  # lazy: pyarrow (the batch extra)
    import pyarrow.parquet as pq  # lazy: pyarrow (the batch extra)

    table = pa.Table.from_pylist(records, schema=parquet_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- reading back
def _decode(rle: dict[str, Any]) -> np.ndarray:
    return mask_util.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()}).astype(bool)  # (H, W)


def _id_map(png: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)  # (H, W, 3)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


class Predictions:
    """A finished ``m2f batch`` output, read back as the post-processing results it was written from.

    ``names`` maps each image's ``file_name`` to its id; :meth:`result` rebuilds the image's result (a
    PanopticResult, an InstanceResult, or a semantic label map) from the PNG or the RLEs.
    """

    def __init__(self, uri: str):
        self.folder = Folder(uri)
        if not self.folder.exists("_SUCCESS"):
            raise FileNotFoundError(f"{uri} has no _SUCCESS: not a finished `m2f batch` output")
        self.job = self.folder.read_json("_job.json")
        self.task = self.job["task"]
        self.config = job_config(self.job)
        images = self.folder.read_json("images.json")["images"]
        self.names = {im["file_name"]: im["id"] for im in images}
        self.ids = set(self.names.values())
        errors = self.folder.read(ERRORS).decode().splitlines()
        self.failed = {json.loads(line)["image_id"] for line in errors if line.strip()}
        self._records = dict(self._read_records())

    def _read_records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        shards = [n for n in self.folder.names("") if n.startswith("shard-")]
        for name in shards:
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq  # lazy: pyarrow (the batch extra)

                for row in pq.read_table(io.BytesIO(self.folder.read(name))).to_pylist():
                    yield row["image_id"], row
                continue
            doc = self.folder.read_json(name)
            if self.task == "panoptic":
                for ann in doc["annotations"]:
                    yield ann["image_id"], ann
                continue
            by_image: dict[int, dict[str, Any]] = {}
            for seg in doc:
                by_image.setdefault(seg["image_id"], {"segments": []})["segments"].append(seg)
            yield from by_image.items()

    def __contains__(self, image_id: int) -> bool:
        """Whether the job wrote a result for the image (not one of those in ``errors.jsonl``)."""
        return image_id in self.ids and image_id not in self.failed

    def result(self, image_id: int) -> Any:
        rec = self._records.get(image_id, {"segments": []})
        segments = rec.get("segments") or rec.get("segments_info") or []
        if self.task == "panoptic":
            if "segments_info" in rec:  # coco: the PNG
                seg_map = _id_map(self.folder.read(panoptic_png_name(image_id)))
            else:
                seg_map = np.zeros((rec["height"], rec["width"]), np.int32)
                for s in segments:
                    seg_map[_decode(s["segmentation"])] = s["id"]
            return PanopticResult(
                seg_map,
                [Segment(s["id"], s["category_id"], s["score"], bool(s["isthing"]), s["area"]) for s in segments],
            )
        masks = [_decode(s["segmentation"]) for s in segments]
        if self.task == "instance":
            return InstanceResult(
                np.stack(masks) if masks else np.zeros((0, 0, 0), bool),
                np.array([s["category_id"] for s in segments], dtype=np.int64),
                np.array([s["score"] for s in segments], dtype=np.float32),
            )
        label_map = np.zeros(masks[0].shape if masks else (0, 0), np.int64)
        for s, m in zip(segments, masks):
            label_map[m] = s["category_id"]
        return label_map
