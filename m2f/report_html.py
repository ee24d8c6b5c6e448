"""The HTML page of an ``m2f eval`` comparison report (:mod:`m2f.eval_report`), and its pictures.

One self-contained file: inline CSS, pictures as ``data:`` URIs (JPEG), charts as inline SVG, no script, so
it opens anywhere without a network. Everything taken from the data (class names, paths, file names) is
HTML-escaped.

Pictures: the image, then its ground truth and every backend's panoptic output drawn over it; each class has
one colour (the dataset's category colour where it gives one), segment borders are white, void is dimmed.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
from PIL import Image

from m2f.eval_images import class_map
from m2f.visualize import palette

MAX_SIDE = 240  # pictures are scaled down to this longest side
ALPHA = 0.7  # opacity of the class colours over the image
CHART_CLASSES = 30  # the per-class charts show the first classes of the table (the largest drops)
SERIES = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#bab0ac")


# ---------------------------------------------------------------------------------------------- pictures
def class_colours(config, categories: list[dict[str, Any]] | None = None) -> list[str]:
    """'#rrggbb' per label id: the dataset's category colour where it has one, else a generated palette."""
    generated = palette(config.num_labels)
    given = {int(c["id"]): c["color"] for c in categories or [] if len(c.get("color") or ()) == 3}
    rgb = [given.get(i, generated[i].tolist()) for i in range(config.num_labels)]
    return ["#{:02x}{:02x}{:02x}".format(*(int(v) for v in c)) for c in rgb]


def _rgb_table(colours: list[str]) -> np.ndarray:
    return np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in colours], dtype=np.float32)  # (K, 3)


def overlay(image: np.ndarray, labels: np.ndarray, ids: np.ndarray | None, colours: list[str]) -> Image.Image:
    """(H, W, 3) uint8 image, (H, W) label ids (-1 or out of range: void), optional (H, W) segment ids for the
    borders -> the picture, scaled to at most ``MAX_SIDE``."""
    table = _rgb_table(colours)
    base = image.astype(np.float32)
    valid = (labels >= 0) & (labels < len(table))
    out = base * 0.35  # void: dimmed
    out[valid] = (1 - ALPHA) * base[valid] + ALPHA * table[labels[valid]]
    edges = ids if ids is not None else labels
    border = np.zeros(labels.shape, bool)
    border[:, :-1] |= edges[:, :-1] != edges[:, 1:]
    border[:-1, :] |= edges[:-1, :] != edges[1:, :]
    out[border] = 255.0
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    picture.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return picture


def _jpeg(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def draw_panels(pil_image: Image.Image, gt: Any, outputs: dict[str, Any], colours: list[str]) -> dict[str, bytes]:
    """JPEG pictures of one image: ``"image"``, ``"gt"`` (panoptic ``(id map, segments_info)`` or a semantic
    label map with 255 = void; absent when None) and one per backend label (its panoptic result)."""
    rgb = np.asarray(pil_image.convert("RGB"))
    plain = Image.fromarray(rgb)
    plain.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    panels = {"image": _jpeg(plain)}
    if isinstance(gt, tuple):
        ids = np.asarray(gt[0], np.int64)
        pairs = [(int(s["id"]), int(s["category_id"])) for s in gt[1]]
        panels["gt"] = _jpeg(overlay(rgb, class_map(ids, pairs), ids, colours))
    elif gt is not None:
        labels = np.asarray(gt, np.int64)
        panels["gt"] = _jpeg(overlay(rgb, np.where(labels == 255, -1, labels), None, colours))
    for label, result in outputs.items():
        ids = np.asarray(result.segmentation, np.int64)
        pairs = [(s.id, s.label_id) for s in result.segments]
        panels[label] = _jpeg(overlay(rgb, class_map(ids, pairs), ids, colours))
    return panels


# ---------------------------------------------------------------------------------------------- HTML pieces
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1280px;
 padding:0 16px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dee4;
 padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#57606a}code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f6f8fa;padding:8px 10px;border-radius:6px;white-space:pre-wrap;word-break:break-all}
table{border-collapse:collapse;margin:6px 0 10px}th,td{padding:3px 8px;border-bottom:1px solid #eaeef2;
 text-align:right;white-space:nowrap}th{background:#f6f8fa;font-weight:600}td.l,th.l{text-align:left}
.scroll{overflow-x:auto}
.down{color:#b42318;font-weight:600}.up{color:#1a7f37}.muted{color:#8c959f}
.legend span{display:inline-block;margin:0 12px 4px 0}.sw{display:inline-block;width:12px;height:12px;
 border-radius:2px;vertical-align:-1px;margin-right:4px;border:1px solid #0003}
.row{display:flex;gap:8px;align-items:flex-start;margin:10px 0;padding:8px;border:1px solid #eaeef2;
 border-radius:6px}.row .info{width:220px;flex:none;font-size:13px}
figure{margin:0;text-align:center}figure img{display:block;border-radius:3px;max-width:240px}
figcaption{font-size:12px;color:#57606a;margin-top:2px}.charts{display:flex;gap:24px;flex-wrap:wrap}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _n(x: float | None, digits: int = 2) -> str:
    return '<span class="muted">-</span>' if x is None else f"{x:.{digits}f}"


def share(x: float) -> str:
    """A fraction as a percentage that never rounds a difference away: 0.0004 -> '<0.1%'."""
    return "0%" if x == 0 else "<0.1%" if x < 0.001 else f"{100 * x:.1f}%"


def _d(x: float | None, eps: float = 0.05) -> str:
    """A difference, red when it drops by more than ``eps`` points, green when it rises by more."""
    if x is None:
        return '<span class="muted">-</span>'
    cls = "down" if x < -eps else "up" if x > eps else "muted"
    return f'<span class="{cls}">{x if abs(x) >= 0.005 else 0.0:+.2f}</span>'


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    th = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def bar_chart(title: str, groups: list[tuple[str, list[float | None]]], series: list[str], vmax: float = 100.0) -> str:
    """A horizontal grouped bar chart as inline SVG: one group per (name, a value per series)."""
    bar, gap, left, width = 9, 7, 150, 300
    n = max(len(series), 1)
    height = 24 + len(groups) * (n * bar + gap) + 22
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{height}" role="img" '
        f'aria-label="{_e(title)}"><text x="0" y="14" font-size="13" font-weight="600">{_e(title)}</text>'
    ]
    y = 24
    for name, values in groups:
        parts.append(
            f'<text x="{left - 6}" y="{y + n * bar / 2 + 4}" font-size="11" text-anchor="end">{_e(name[:22])}</text>'
        )
        for i, v in enumerate(values):
            colour = SERIES[i % len(SERIES)]
            w = 0 if v is None else max(0.0, min(v, vmax)) / vmax * width
            parts.append(f'<rect x="{left}" y="{y + i * bar}" width="{w:.1f}" height="{bar - 1}" fill="{colour}"/>')
            text = "-" if v is None else f"{v:.1f}"
            parts.append(f'<text x="{left + w + 3:.1f}" y="{y + i * bar + bar - 2}" font-size="9">{text}</text>')
        y += n * bar + gap
    for i, s in enumerate(series):  # legend
        x = left + i * 110
        parts.append(f'<rect x="{x}" y="{y + 6}" width="10" height="10" fill="{SERIES[i % len(SERIES)]}"/>')
        parts.append(f'<text x="{x + 14}" y="{y + 15}" font-size="11">{_e(s[:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(report: dict[str, Any]) -> str:
    items = "".join(
        f'<span><span class="sw" style="background:{_e(c["color"])}"></span>{_e(c["name"])}</span>'
        for c in report["classes"]
    )
    return f'<p class="legend">{items}</p>'


def _gallery_row(info: str, image_id: int, pictures: dict[int, dict[str, bytes]], labels: list[str], name: str) -> str:
    """One image's pictures side by side (image | ground truth | each backend), anchored as ``img-<id>``."""
    panels = pictures.get(image_id, {})
    figures = []
    for key, caption in [("image", "image"), ("gt", "ground truth"), *((lab, lab) for lab in labels)]:
        if key in panels:
            img = f'<img src="{_data_uri(panels[key])}" alt="{_e(f"{caption} of {name}")}">'
            figures.append(f"<figure>{img}<figcaption>{_e(caption)}</figcaption></figure>")
    return f'<div class="row" id="img-{image_id}"><div class="info">{info}</div>{"".join(figures)}</div>'


# ---------------------------------------------------------------------------------------------- sections
def _provenance(report: dict[str, Any]) -> str:
    torch_hashes = {b["sha256"] for b in report["backends"] if b["runtime"] == "torch"}
    rows = []
    for b in report["backends"]:
        source = b.get("source_sha256")
        src = "-" if not source else f'<code title="{_e(source)}">{_e(source[:12])}</code>'
        if source and source in torch_hashes:
            src += " (the torch checkpoint above)"
        rows.append([
            f"<b>{_e(b['label'])}</b>", _e(b["runtime"]), _e(b["precision"]), _e(b["device"]),
            f'<code>{_e(b["path"])}</code>', f'<code title="{_e(b["sha256"])}">{_e(b["sha256"][:12])}</code>', src,
            _n(report["timings"][b["label"]]["load_s"], 1),
        ])  # fmt: skip
    data = report["data"]
    hashes = "".join(
        f"<li><code>{_e(name)}</code> sha256 <code>{_e(h)}</code></li>" for name, h in data["annotation_sha256"].items()
    )
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in report["versions"].items())
    return (
        '<h2 id="provenance">What produced this report</h2>'
        f"<pre>{_e(report['command'] or '')}</pre>"
        + _table(["backend", "runtime", "precision", "device", "file", "sha256", "exported from", "load s"], rows, 5)
        + f"<p>Data: <code>{_e(data['root'])}</code>"
        + (f" (split {_e(data['split'])})" if data.get("split") else "")
        + f", {data['num_images']} image(s), tasks {_e(', '.join(data['tasks']))}.</p><ul>{hashes}</ul>"
        + f'<p class="meta">{versions}; batch size {report["settings"]["batch_size"]}.</p>'
    )


def _summary(report: dict[str, Any], labels: list[str]) -> str:
    head = ["metric", *(_e(lab) for lab in labels[:1])]
    for lab in labels[1:]:
        head += [_e(lab), f"&Delta; {_e(lab)}"]
    rows = []
    for r in report["summary"]:
        row = [f"{_e(r['metric'])} <span class='muted'>{_e(r['task'])}</span>", _n(r["values"][labels[0]])]
        for lab in labels[1:]:
            row += [_n(r["values"][lab]), _d(r["delta"][lab])]
        rows.append(row)
    return '<h2 id="summary">Scores</h2>' + _table(head, rows)


_COLUMN_NAMES = {"pq": "PQ", "sq": "SQ", "rq": "RQ", "tp": "TP", "fp": "FP", "fn": "FN", "iou": "IoU"}


def _classes(report: dict[str, Any], labels: list[str]) -> str:
    tasks = report["data"]["tasks"]
    keys = [k for k, task in (("pq", "panoptic"), ("iou", "semantic")) if task in tasks]  # the compared scores
    cols = ["pq", "sq", "rq", "tp", "fp", "fn"] if "panoptic" in tasks else []
    cols += ["iou"] if "semantic" in tasks else []
    per = report["per_class"]
    charts = [
        bar_chart(
            f"{_COLUMN_NAMES[k]} per class",
            [(r["name"], [r["backends"][lab].get(k) for lab in labels]) for r in per[:CHART_CLASSES]],
            labels,
        )
        for k in keys
    ]
    muted = "<span class='muted'>{}</span>".format
    head = ["class", "kind"] + [f"&Delta;{_COLUMN_NAMES[k]} {muted(_e(lab))}" for lab in labels[1:] for k in keys]
    head += [f"{_COLUMN_NAMES[c]} {muted(_e(lab))}" for lab in labels for c in cols]
    rows = []
    for r in per:
        swatch = f'<span class="sw" style="background:{_e(_colour(report, r["id"]))}"></span>'
        row = [swatch + _e(r["name"]), "thing" if r["isthing"] else "stuff"]
        row += [_d(r["delta"][lab][k]) for lab in labels[1:] for k in keys]
        for lab in labels:
            b = r["backends"][lab]
            row += [str(b.get(c)) if c in ("tp", "fp", "fn") else _n(b.get(c)) for c in cols]
        rows.append(row)
    order = f"sorted by the largest drop of PQ or IoU against {_e(labels[0])}" if len(labels) > 1 else "lowest first"
    return (
        f'<h2 id="classes">Per class</h2><p class="meta">{order}; the charts show the first {CHART_CLASSES} rows.</p>'
        f'<div class="charts">{"".join(charts)}</div><div class="scroll">{_table(head, rows, 2)}</div>'
    )


def _colour(report: dict[str, Any], cid: int) -> str:
    return next((c["color"] for c in report["classes"] if c["id"] == cid), "#888888")


def _changes(d: dict[str, Any]) -> str:
    ch = d["changes"]
    parts = [f"+{_e(x['label'])} ({x['area']} px)" for x in ch["added"]]
    parts += [f"&minus;{_e(x['label'])} ({x['area']} px)" for x in ch["lost"]]
    parts += [f"{_e(x['from'])} &rarr; {_e(x['to'])} ({x['area']} px)" for x in ch["relabelled"]]
    return "; ".join(parts) or "no segment changed"


def _disagreement(report: dict[str, Any], pictures, labels: list[str]) -> str:
    if len(labels) < 2:
        return ""
    out = [
        '<h2 id="disagreement">Where the backends disagree most</h2><p class="meta">Against '
        f"{_e(labels[0])}: segments added (+), lost (&minus;) or relabelled (&rarr;), segments matched at IoU &gt; "
        "0.5; the share of pixels whose class differs. Only images where something differs.</p>"
    ]
    if not report["disagreement"]:
        out.append("<p>Every backend gave the same class to every pixel of every image.</p>")
    for r in report["disagreement"]:
        info = f"<b>{_e(r['file_name'])}</b> <span class='muted'>id {r['image_id']}</span>"
        for lab, d in r["backends"].items():
            if not (d["pixel_disagreement"] or d["added"] or d["lost"] or d["relabelled"]):
                info += f"<br><b>{_e(lab)}</b>: <span class='muted'>the same</span>"
                continue
            info += (
                f"<br><b>{_e(lab)}</b>: {share(d['pixel_disagreement'])} of the pixels, +{d['added']} "
                f"&minus;{d['lost']} &rarr;{d['relabelled']}<br><span class='muted'>{_changes(d)}</span>"
            )
        out.append(_gallery_row(info, r["image_id"], pictures, labels, r["file_name"]))
    return "".join(out)


def _quality_cells(r: dict[str, Any]) -> list[str]:
    if "pq" not in r:
        return [_n(r["miou"], 1), _n(r["pixel_accuracy"], 1)]
    missed = ", ".join(f"{_e(k)} &times;{v}" for k, v in r["missed"].items()) or "-"
    invented = ", ".join(f"{_e(k)} &times;{v}" for k, v in r["invented"].items()) or "-"
    return [_n(r["pq"], 1), str(r["tp"]), str(r["fp"]), str(r["fn"]), missed, invented]


def _worst(report: dict[str, Any], pictures, labels: list[str]) -> str:
    """A table per backend, then the pictures of the listed images not shown above."""
    if not any(report["worst"].values()):
        return ""
    out = ['<h2 id="worst">Where each backend does worst against the ground truth</h2>']
    shown = {r["image_id"] for r in report["disagreement"]}
    gallery: dict[int, str] = {}
    scores: dict[int, list[str]] = {}
    for lab, rows in report["worst"].items():
        if not rows:
            continue
        pq = "pq" in rows[0]
        head = ["image", *(["PQ", "TP", "FP", "FN", "missed (FN)", "invented (FP)"] if pq else ["mIoU", "pixel acc."])]
        table_rows = []
        for r in rows:
            table_rows.append([f'<a href="#img-{r["image_id"]}">{_e(r["file_name"])}</a>', *_quality_cells(r)])
            gallery.setdefault(r["image_id"], r["file_name"])
            scores.setdefault(r["image_id"], []).append(f"{_e(lab)}: {_quality_cells(r)[0]}")
        out.append(f"<h3>{_e(lab)}</h3>" + _table(head, table_rows))
    for image_id, name in gallery.items():
        if image_id not in shown:
            info = f"<b>{_e(name)}</b> <span class='muted'>id {image_id}</span><br>" + "<br>".join(scores[image_id])
            out.append(_gallery_row(info, image_id, pictures, labels, name))
    return "".join(out)


def _timings(report: dict[str, Any], labels: list[str]) -> str:
    t = report["timings"]
    rows = [
        [_e(lab), _n(t[lab]["load_s"], 1), _n(t[lab]["inference_s"], 2), _n(t[lab]["inference_ms_per_image"], 1),
         _n(1000 * t[lab]["postprocess_s"] / t[lab]["images"], 1), _n(t[lab]["images_per_s"], 2)]
        for lab in labels
    ]  # fmt: skip
    vmax = max((t[lab]["inference_ms_per_image"] for lab in labels), default=1.0) or 1.0
    chart = bar_chart(
        "inference ms / image",
        [
            (lab, [t[lab]["inference_ms_per_image"] if i == j else None for j in range(len(labels))])
            for i, lab in enumerate(labels)
        ],
        labels,
        vmax=vmax * 1.15,
    )
    head = ["backend", "load s", "inference s", "inference ms/image", "post-processing ms/image", "images/s"]
    return (
        '<h2 id="timings">Timings</h2><p class="meta">The first batch ran once untimed (warm-up); the backends took '
        "turns batch by batch on the same machine.</p>" + _table(head, rows) + chart
    )


def render(report: dict[str, Any], pictures: dict[int, dict[str, bytes]]) -> str:
    """The report (:func:`m2f.eval_report.compare`) as one self-contained HTML page."""
    labels = [b["label"] for b in report["backends"]]
    title = "m2f eval: " + " vs ".join(labels)
    data = report["data"]
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{data["num_images"]} image(s) of <code>{_e(data["root"])}</code>; created {_e(report["created"])}'
        f"; {_e(report['schema'])}</p>",
        _summary(report, labels),
        _classes(report, labels),
        _legend(report),
        _disagreement(report, pictures, labels),
        _worst(report, pictures, labels),
        _timings(report, labels),
        _provenance(report),
    ]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
