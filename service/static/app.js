// The web page of the segmentation service: send an image to POST v1/models/{name}/segment (the model chosen in
// the menu, filled from GET v1/models), draw the segments over it.
//
// The drawing is visualize.py's (m2f predict --overlay), pixel for pixel, from overlay.js: segment i gets
// palette colour i, segments are drawn by score (lowest first), each filled with half its colour and outlined;
// its label sits at the point of the mask farthest from its border. Labels are DOM elements over the canvas,
// so the canvas holds only the blended image.
//
// window.__m2f exposes the state for tests and debugging (decoded masks, label places, pole()).

import { blendSegments, decodeCounts, decodeMask, drawingOrder, paletteColour, placeLabels, pole } from "./overlay.js";

// ------------------------------------------------------------------------------------------- page state
const $ = (id) => document.getElementById(id);
const state = {
  status: "idle", // idle | busy | done | error
  runs: 0, // requests answered (ok or not)
  file: null,
  response: null, // parsed JSON of the last answer
  width: 0,
  height: 0,
  base: null, // ImageData of the image as the browser decoded it
  segments: [], // {index, record, colour, mask, place, visible, row, labelEl}
  order: [],
  jsonUrl: null,
  seq: 0,
  defaults: null, // the chosen model's post-processing defaults (GET v1/models/{name})
};

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setStatus(text) {
  $("status").textContent = text;
}

async function describeError(response) {
  const text = await response.text();
  let message = text.trim() || response.statusText;
  try {
    const { error } = JSON.parse(text);
    if (error) message = `${error.reason}: ${error.message}`;
  } catch {
    // not JSON: the text as it came
  }
  const retry = response.headers.get("Retry-After");
  return `${response.status} ${message}${retry ? ` (retry after ${retry} s)` : ""}`;
}

// ------------------------------------------------------------------------------------------- model info
// The model menu, from GET v1/models (the default model chosen), then the chosen model's description.
async function loadModels() {
  try {
    const r = await fetch("v1/models");
    if (!r.ok) throw new Error(await describeError(r));
    const listing = await r.json();
    const ready = listing.models.filter((m) => m.state === "ready");
    if (!ready.length) {
      $("model").textContent = "model loading…";
      setTimeout(loadModels, 2000);
      return;
    }
    const menu = $("modelname");
    menu.replaceChildren(
      ...ready.map((m) => {
        const option = document.createElement("option");
        option.value = m.name;
        option.textContent = m.name;
        option.selected = m.name === listing.default;
        return option;
      }),
    );
    await loadModelInfo();
  } catch (e) {
    $("model").textContent = `model info unavailable (${e.message})`;
  }
}

function modelPath() {
  return `v1/models/${encodeURIComponent($("modelname").value)}`;
}

async function loadModelInfo() {
  try {
    const r = await fetch(modelPath());
    if (r.status === 503) {
      $("model").textContent = "model loading…";
      setTimeout(loadModelInfo, 2000);
      return;
    }
    if (!r.ok) throw new Error(await describeError(r));
    const info = await r.json();
    $("model").textContent = `${info.model} (${info.name} v${info.version}) · ${info.runtime}`;
    if (!state.file) $("task").value = info.default_task;
    state.defaults = info.defaults;
    $("overlap_mask_area_threshold").placeholder = String(info.defaults.panoptic.overlap_mask_area_threshold);
    $("max_instances").placeholder = String(info.defaults.instance.max_instances);
    taskChanged();
  } catch (e) {
    $("model").textContent = `model info unavailable (${e.message})`;
  }
}

// Only the settings the task uses are enabled; the threshold's default is the server's for that task.
function taskChanged() {
  const task = $("task").value;
  $("overlap_mask_area_threshold").disabled = task !== "panoptic";
  $("max_instances").disabled = task !== "instance";
  $("threshold").disabled = task === "semantic";
  // instance: null means no score threshold (the official top-k)
  const threshold = state.defaults && state.defaults[task] ? state.defaults[task].threshold : undefined;
  if (state.defaults) $("threshold").placeholder = threshold === null || threshold === undefined ? "none" : String(threshold);
}

// ------------------------------------------------------------------------------------------- request
function queryString() {
  const params = new URLSearchParams({ task: $("task").value });
  for (const name of ["threshold", "overlap_mask_area_threshold", "max_instances"]) {
    const value = $(name).value.trim();
    if (value !== "" && !$(name).disabled) params.set(name, value);
  }
  return params.toString();
}

async function decodeImage(file) {
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

async function run() {
  const file = state.file;
  if (!file) return;
  const seq = ++state.seq;
  state.status = "busy";
  $("run").disabled = true;
  showError("");
  setStatus(`segmenting ${file.name}…`);
  const image = decodeImage(file).catch((e) => e);
  try {
    const r = await fetch(`${modelPath()}/segment?${queryString()}`, {
      method: "POST",
      body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const text = r.ok ? await r.text() : null;
    const error = r.ok ? null : await describeError(r);
    const base = await image;
    if (seq !== state.seq) return; // a newer request started
    if (error) throw new Error(error);
    show(JSON.parse(text), text, base, file.name);
    state.status = "done";
  } catch (e) {
    if (seq !== state.seq) return;
    state.status = "error";
    showError(e.message || String(e));
    setStatus("");
  } finally {
    if (seq === state.seq) {
      state.runs++;
      $("run").disabled = !state.file;
    }
  }
}

// ------------------------------------------------------------------------------------------- results
function show(body, text, base, name) {
  state.response = body;
  if (state.jsonUrl) URL.revokeObjectURL(state.jsonUrl);
  state.jsonUrl = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const link = $("json");
  link.href = state.jsonUrl;
  link.download = `${name.replace(/\.[^.]*$/, "") || "image"}.json`;
  link.hidden = false;
  showTimings(body.timings || {});
  state.width = body.width;
  state.height = body.height;
  state.segments = body.segments.map((record, index) => {
    const mask = decodeMask(record.segmentation);
    return { index, record, mask, colour: paletteColour(index), visible: true };
  });
  state.order = drawingOrder(body.segments);
  buildLegend();
  const n = body.segments.length;
  setStatus(`${body.task} · ${n} segment${n === 1 ? "" : "s"} · ${body.width}×${body.height} · ${body.model}`);
  if (base instanceof Error || base.width !== body.width || base.height !== body.height) {
    state.base = null;
    $("frame").hidden = true;
    $("drop").hidden = false;
    const why = base instanceof Error ? "cannot display this image format" : `decoded it as ${base.width}×${base.height}`;
    showError(`The browser ${why}; the segments (legend, JSON) are for ${body.width}×${body.height}.`);
    return;
  }
  state.base = base;
  const canvas = $("view");
  canvas.width = base.width;
  canvas.height = base.height;
  const zoom = Math.max(1, Math.floor(640 / Math.max(base.width, base.height))); // small images: whole pixels up
  canvas.style.width = `${base.width * zoom}px`;
  canvas.style.imageRendering = zoom > 1 ? "pixelated" : "auto";
  $("drop").hidden = true;
  $("frame").hidden = false;
  render();
}

function showTimings(timings) {
  const dl = $("timings");
  dl.replaceChildren();
  for (const [key, value] of Object.entries(timings)) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = key.replace(/_s$/, "");
    dd.textContent = key.endsWith("_s") ? `${(value * 1000).toFixed(1)} ms` : String(value);
    dd.dataset.key = key;
    dl.append(dt, dd);
  }
  dl.hidden = Object.keys(timings).length === 0;
}

function swatch(colour) {
  const span = document.createElement("span");
  span.className = "swatch";
  span.style.background = `rgb(${colour.join(",")})`;
  return span;
}

function labelText(record) {
  return record.score === null || record.score === undefined ? record.label : `${record.label} ${record.score.toFixed(2)}`;
}

function buildLegend() {
  const body = $("legend").tBodies[0];
  body.replaceChildren();
  $("labels").replaceChildren();
  for (const seg of state.segments) {
    const r = seg.record;
    const row = body.insertRow();
    row.dataset.index = seg.index;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.dataset.index = seg.index;
    box.title = "show this segment";
    row.insertCell().append(box);
    row.insertCell().append(swatch(seg.colour));
    row.insertCell().textContent = r.label;
    const score = row.insertCell();
    score.className = "num";
    score.textContent = r.score === null || r.score === undefined ? "—" : r.score.toFixed(3);
    const area = row.insertCell();
    area.className = "num";
    area.textContent = String(r.area);
    seg.row = row;
    const label = document.createElement("div");
    label.className = "label";
    label.dataset.index = seg.index;
    label.textContent = labelText(r);
    label.style.borderLeftColor = `rgb(${seg.colour.join(",")})`;
    seg.labelEl = label;
  }
  $("labels").append(...state.segments.filter((s) => s.mask.area).map((s) => s.labelEl));
  $("legend").hidden = state.segments.length === 0;
  $("all").checked = true;
}

// The canvas: visualize.blend_segments of the visible segments.
function render() {
  if (!state.base) return;
  const shown = state.order.map((i) => state.segments[i]).filter((s) => s.visible);
  const out = blendSegments(state.base.data, state.width, state.height, shown);
  $("view").getContext("2d").putImageData(new ImageData(out, state.width, state.height), 0, 0);
  layoutLabels();
}

// Label elements: measured, placed with placeLabels in image pixels, positioned in % of the frame.
function layoutLabels() {
  const canvas = $("view");
  if (!state.base || !canvas.clientWidth) return;
  const scale = canvas.clientWidth / state.width; // CSS px per image px
  const shown = [];
  for (const seg of state.segments) {
    if (!seg.labelEl) continue;
    seg.labelEl.hidden = !(seg.visible && seg.mask.area);
    seg.place = null;
    if (!seg.labelEl.hidden) shown.push(seg);
  }
  const sizes = shown.map((s) => [
    Math.ceil(s.labelEl.offsetWidth / scale),
    Math.ceil(s.labelEl.offsetHeight / scale),
  ]);
  const places = placeLabels(shown.map((s) => s.mask), sizes, state.width, state.height);
  shown.forEach((seg, k) => {
    seg.place = places[k];
    const [left, top] = places[k].box;
    seg.labelEl.style.left = `${(100 * left) / state.width}%`;
    seg.labelEl.style.top = `${(100 * top) / state.height}%`;
  });
  // score order; an empty mask (an instance pair kept at score 0, as the official top-k keeps it) has no label
  for (const i of state.order) if (state.segments[i].labelEl && state.segments[i].mask.area) $("labels").append(state.segments[i].labelEl);
}

// ------------------------------------------------------------------------------------------- interaction
function segmentsAt(x, y) {
  const hits = [];
  for (const i of [...state.order].reverse()) { // topmost first
    const seg = state.segments[i];
    const m = seg.mask;
    const inside = x >= m.x0 && y >= m.y0 && x < m.x0 + m.w && y < m.y0 + m.h && m.data[(y - m.y0) * m.w + x - m.x0];
    if (seg.visible && inside) hits.push(seg);
  }
  return hits;
}

function onHover(event) {
  const canvas = $("view");
  const rect = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - rect.left) * state.width) / rect.width);
  const y = Math.floor(((event.clientY - rect.top) * state.height) / rect.height);
  const hits = state.base && x >= 0 && y >= 0 && x < state.width && y < state.height ? segmentsAt(x, y) : [];
  const tip = $("tooltip");
  for (const seg of state.segments) seg.row.classList.toggle("hover", hits.includes(seg));
  if (!hits.length) {
    tip.hidden = true;
    delete tip.dataset.index;
    return;
  }
  tip.replaceChildren();
  hits.forEach((seg, k) => {
    const line = document.createElement("div");
    const r = seg.record;
    const score = r.score === null || r.score === undefined ? "" : ` · score ${r.score.toFixed(3)}`;
    line.append(swatch(seg.colour), `${r.label}${score} · ${r.area} px`);
    if (k > 0) line.className = "muted";
    tip.append(line);
  });
  tip.dataset.index = hits[0].index;
  tip.dataset.x = x;
  tip.dataset.y = y;
  tip.hidden = false;
  // beside the pointer, on the side where it fits in the image
  const px = event.clientX - rect.left, py = event.clientY - rect.top;
  tip.style.left = `${px + 14 + tip.offsetWidth <= rect.width ? px + 14 : Math.max(px - 14 - tip.offsetWidth, 0)}px`;
  tip.style.top = `${py + 14 + tip.offsetHeight <= rect.height ? py + 14 : Math.max(py - 14 - tip.offsetHeight, 0)}px`;
}

function onToggle(event) {
  const box = event.target;
  if (box.id === "all") {
    for (const seg of state.segments) {
      seg.visible = box.checked;
      seg.row.querySelector("input").checked = box.checked;
    }
  } else if (box.dataset.index !== undefined) {
    state.segments[Number(box.dataset.index)].visible = box.checked;
  } else {
    return;
  }
  for (const seg of state.segments) seg.row.classList.toggle("off", !seg.visible);
  render();
}

function choose(file) {
  if (!file) return;
  state.file = file;
  $("run").disabled = false;
  run();
}

function setup() {
  $("controls").addEventListener("submit", (e) => {
    e.preventDefault();
    run();
  });
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  $("task").addEventListener("change", taskChanged);
  $("modelname").addEventListener("change", async () => {
    await loadModelInfo();
    if (state.file) run();
  });
  for (const id of ["task", "threshold", "overlap_mask_area_threshold", "max_instances"]) {
    $(id).addEventListener("change", () => state.file && run());
  }
  $("legend").addEventListener("change", onToggle);
  $("frame").addEventListener("mousemove", onHover);
  $("frame").addEventListener("mouseleave", () => onHover({ clientX: -1e9, clientY: -1e9 }));
  const stage = $("stage");
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    stage.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => e.relatedTarget || stage.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("dragging");
    choose(e.dataTransfer.files[0]);
  });
  new ResizeObserver(() => layoutLabels()).observe($("view"));
  taskChanged();
  loadModels();
}

// For tests and debugging: the page's state, read-only views.
window.__m2f = {
  get status() { return state.status; },
  get runs() { return state.runs; },
  get width() { return state.width; },
  get height() { return state.height; },
  get response() { return state.response; },
  get segments() {
    return state.segments.map((s) => ({
      index: s.index,
      label: s.record.label,
      colour: s.colour,
      area: s.mask.area,
      bbox: [s.mask.x0, s.mask.y0, s.mask.w, s.mask.h],
      pole: s.mask.area ? pole(s.mask) : null, // where the label goes with no other label in the way
      labelPoint: s.place ? s.place.point : null,
      labelBox: s.place ? s.place.box : null,
      visible: s.visible,
    }));
  },
  drawingOrder: () => [...state.order],
  // every segment's mask at full size, row-major, one bit a pixel (most significant first, as numpy.packbits),
  // one after the other, as base64
  masks() {
    const size = state.width * state.height;
    const bytes = new Uint8Array(Math.ceil((state.segments.length * size) / 8));
    state.segments.forEach(({ mask: m }, k) => {
      for (let y = 0; y < m.h; y++) {
        for (let x = 0; x < m.w; x++) {
          if (!m.data[y * m.w + x]) continue;
          const p = k * size + (y + m.y0) * state.width + x + m.x0;
          bytes[p >> 3] |= 0x80 >> (p & 7);
        }
      }
    });
    let text = "";
    for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
    return btoa(text);
  },
  // the label point of a mask given as a "0"/"1" string (w x h, row-major)
  pole(bits, w, h) {
    const data = Uint8Array.from(bits, (c) => (c === "1" ? 1 : 0));
    return pole({ x0: 0, y0: 0, w, h, data, area: data.reduce((a, b) => a + b, 0) });
  },
  decodeCounts,
};

setup();
