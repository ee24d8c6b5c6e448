// Drawing segments over an image as m2f/visualize.py does (m2f predict --overlay), for the web page:
// COCO RLE decoding, the blend of fills and outlines, label placement, colours. Same rules and arithmetic as
// visualize.py, so both give the same pixels and label points (tests/test_web.py compares them).

const ALPHA = 0.5; // fill opacity, as visualize.draw_overlay
const POLE_GRID = 256; // as visualize.POLE_GRID

// ------------------------------------------------------------------------------------------- COCO RLE
// The compressed "counts" string of pycocotools (rleToString / rleFrString in maskApi.c): each count is a
// little-endian base-32 number, 5 bits per character (char - 48), bit 0x20 = more characters follow, bit
// 0x10 of the last character = negative. From the third count on, the value is a delta to the count two
// places before (runs of the same value, 0s or 1s, tend to be alike).
export function decodeCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= s.length) throw new Error("truncated RLE counts string");
      const c = s.charCodeAt(p) - 48;
      if (c < 0 || c > 63) throw new Error(`invalid character in RLE counts: ${s[p]}`);
      x += (c & 0x1f) * 2 ** (5 * k); // arithmetic, not <<: exact past 32 bits
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k); // sign-extend
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    if (x < 0) throw new Error("negative run in RLE counts");
    counts.push(x);
  }
  return counts;
}

// {size: [h, w], counts} -> {x0, y0, w, h, data, area}: the mask cropped to its bounding box, row-major
// (data[y * w + x] = 1 inside). Runs alternate 0s and 1s, starting with 0s, down the columns (Fortran order).
export function decodeMask(rle) {
  const [height, width] = rle.size;
  const counts = typeof rle.counts === "string" ? decodeCounts(rle.counts) : rle.counts;
  const total = counts.reduce((a, b) => a + b, 0);
  if (total !== height * width) throw new Error(`RLE covers ${total} pixels, not ${height}x${width}`);
  let x0 = width, y0 = height, x1 = -1, y1 = -1, area = 0;
  forEachRun(counts, height, (start, n) => {
    area += n;
    const first = start, last = start + n - 1;
    x0 = Math.min(x0, Math.floor(first / height));
    x1 = Math.max(x1, Math.floor(last / height));
    // a run spanning a column boundary reaches the top and bottom rows
    y0 = Math.min(y0, Math.floor(first / height) === Math.floor(last / height) ? first % height : 0);
    y1 = Math.max(y1, Math.floor(first / height) === Math.floor(last / height) ? last % height : height - 1);
  });
  if (area === 0) return { x0: 0, y0: 0, w: 0, h: 0, data: new Uint8Array(0), area: 0 };
  const w = x1 - x0 + 1, h = y1 - y0 + 1;
  const data = new Uint8Array(w * h);
  forEachRun(counts, height, (start, n) => {
    for (let i = start; i < start + n; i++) {
      data[((i % height) - y0) * w + Math.floor(i / height) - x0] = 1;
    }
  });
  return { x0, y0, w, h, data, area };
}

function forEachRun(counts, height, fn) {
  let pos = 0;
  for (let j = 0; j < counts.length; j++) {
    if (j % 2 === 1 && counts[j] > 0) fn(pos, counts[j]);
    pos += counts[j];
  }
}

// ------------------------------------------------------------------------------------------- placement
// Exact squared Euclidean distance of each pixel of fg (h x w, row-major 0/1) to the nearest 0 pixel,
// pixels outside counting as 0: a pass down the columns, then the lower envelope of parabolas along the rows
// (Felzenszwalb & Huttenlocher 2012). Returns a Float64Array (h x w) of integers.
export function squaredDistance(fg, w, h) {
  const W = w + 2, H = h + 2; // padded by one background pixel
  const g = new Float64Array(W * H);
  const inside = (x, y) => x > 0 && y > 0 && x <= w && y <= h && fg[(y - 1) * w + x - 1] === 1;
  for (let x = 0; x < W; x++) {
    let last = -Infinity;
    for (let y = 0; y < H; y++) {
      if (!inside(x, y)) last = y;
      g[y * W + x] = y - last;
    }
    last = Infinity;
    for (let y = H - 1; y >= 0; y--) {
      if (!inside(x, y)) last = y;
      g[y * W + x] = Math.min(g[y * W + x], last - y);
    }
  }
  const f = new Float64Array(W), d = new Float64Array(W), v = new Int32Array(W), z = new Float64Array(W + 1);
  const out = new Float64Array(w * h);
  for (let y = 1; y <= h; y++) {
    for (let x = 0; x < W; x++) f[x] = g[y * W + x] * g[y * W + x];
    envelope(f, W, d, v, z);
    for (let x = 1; x <= w; x++) out[(y - 1) * w + x - 1] = d[x];
  }
  return out;
}

// d[q] = min_p (q - p)^2 + f[p] over p in 0..n-1 (the arithmetic of visualize.lower_envelope).
function envelope(f, n, d, v, z) {
  let k = 0;
  v[0] = 0;
  z[0] = -Infinity;
  z[1] = Infinity;
  for (let q = 1; q < n; q++) {
    let s;
    for (;;) {
      const p = v[k];
      s = (f[q] + q * q - (f[p] + p * p)) / (2 * (q - p));
      if (s <= z[k]) k--;
      else break;
    }
    k++;
    v[k] = q;
    z[k] = s;
    z[k + 1] = Infinity;
  }
  k = 0;
  for (let q = 0; q < n; q++) {
    while (z[k + 1] < q) k++;
    d[q] = (q - v[k]) * (q - v[k]) + f[v[k]];
  }
}

// [x, y] of the 1-pixel of fg (w x h, not all 0) farthest from its border; ties: nearest to the mean of the
// tied pixels, then first in row-major order.
function poleExact(fg, w, h) {
  const d = squaredDistance(fg, w, h);
  let best = 0;
  for (let i = 0; i < d.length; i++) best = Math.max(best, d[i]);
  let n = 0, sx = 0, sy = 0;
  for (let i = 0; i < d.length; i++) {
    if (d[i] === best) {
      n++;
      sx += i % w;
      sy += Math.floor(i / w);
    }
  }
  const cx = sx / n, cy = sy / n;
  let pick = -1, pickDist = Infinity;
  for (let i = 0; i < d.length; i++) {
    if (d[i] !== best) continue;
    const x = i % w, y = Math.floor(i / w);
    const dist = (x - cx) * (x - cx) + (y - cy) * (y - cy);
    if (dist < pickDist) {
      pick = i;
      pickDist = dist;
    }
  }
  return [pick % w, Math.floor(pick / w)];
}

// [x, y] in the mask {x0, y0, w, h, data} (image coordinates) where its label goes: visualize.pole.
export function pole(mask) {
  const { w, h, data } = mask;
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (data[y * w + x]) {
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
      }
    }
  }
  if (x1 < 0) throw new Error("empty mask has no label point");
  const cw = x1 - x0 + 1, ch = y1 - y0 + 1;
  const crop = new Uint8Array(cw * ch);
  for (let y = 0; y < ch; y++) for (let x = 0; x < cw; x++) crop[y * cw + x] = data[(y + y0) * w + x + x0];
  const ox = mask.x0 + x0, oy = mask.y0 + y0;
  const s = Math.ceil(Math.max(cw, ch) / POLE_GRID);
  if (s > 1) {
    const bw = Math.ceil(cw / s), bh = Math.ceil(ch / s);
    const blocks = new Uint8Array(bw * bh);
    let any = false;
    for (let by = 0; by < bh; by++) {
      for (let bx = 0; bx < bw; bx++) {
        let full = (by + 1) * s <= ch && (bx + 1) * s <= cw;
        for (let y = by * s; full && y < (by + 1) * s; y++) {
          for (let x = bx * s; x < (bx + 1) * s; x++) if (!crop[y * cw + x]) { full = false; break; }
        }
        blocks[by * bw + bx] = full ? 1 : 0;
        any ||= full;
      }
    }
    if (any) {
      const [bx, by] = poleExact(blocks, bw, bh);
      return [ox + bx * s + Math.floor((s - 1) / 2), oy + by * s + Math.floor((s - 1) / 2)];
    }
  }
  const [x, y] = poleExact(crop, cw, ch);
  return [ox + x, oy + y];
}

// Boxes for labels of sizes [w, h] (image pixels) on masks: visualize.place_labels. Returns
// [{point: [x, y], box: [left, top, right, bottom]}] in the order of masks.
export function placeLabels(masks, sizes, width, height) {
  const occupied = new Uint8Array(width * height), taken = new Uint8Array(width * height);
  const order = masks.map((_, i) => i).sort((a, b) => masks[a].area - masks[b].area || a - b);
  const places = new Array(masks.length);
  for (const i of order) {
    const m = masks[i];
    const part = (blocked) => {
      const data = new Uint8Array(m.w * m.h);
      let any = false;
      for (let y = 0; y < m.h; y++) {
        for (let x = 0; x < m.w; x++) {
          const j = (y + m.y0) * width + x + m.x0;
          data[y * m.w + x] = m.data[y * m.w + x] && !blocked(j) ? 1 : 0;
          any ||= data[y * m.w + x] === 1;
        }
      }
      return any ? { ...m, data } : null;
    };
    const region = part((j) => occupied[j] || taken[j]) || part((j) => taken[j]) || m;
    const [x, y] = pole(region);
    const [w, h] = sizes[i];
    const left = Math.min(Math.max(x - Math.floor(w / 2), 0), Math.max(width - w, 0));
    const top = Math.min(Math.max(y - Math.floor(h / 2), 0), Math.max(height - h, 0));
    for (let yy = top; yy < Math.min(top + h, height); yy++) {
      occupied.fill(1, yy * width + left, yy * width + Math.min(left + w, width));
    }
    taken[y * width + x] = 1;
    places[i] = { point: [x, y], box: [left, top, left + w, top + h] };
  }
  return places;
}

// ------------------------------------------------------------------------------------------- colours
// visualize.palette: golden-ratio hues, HSV (h, 0.75, 0.95), as Python's colorsys, truncated to 0..255.
export function paletteColour(i) {
  const h = (i * 0.618034) % 1.0, s = 0.75, v = 0.95;
  const k = Math.trunc(h * 6.0), f = h * 6.0 - k;
  const p = v * (1.0 - s), q = v * (1.0 - s * f), t = v * (1.0 - s * (1.0 - f));
  const rgb = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][k % 6];
  return rgb.map((c) => Math.trunc(255 * c));
}

// visualize.drawing_order: by score, lowest first, stable; no score counts as lowest.
export function drawingOrder(records) {
  const score = (r) => (r.score === null || r.score === undefined ? -Infinity : r.score);
  return records.map((_, i) => i).sort((a, b) => score(records[a]) - score(records[b]) || a - b);
}

// ------------------------------------------------------------------------------------------- drawing
// visualize.blend_segments: base (RGBA bytes, width x height) with each of segments ({mask, colour}, in
// drawing order) filled with ALPHA of its colour and outlined in it (pixels with a 4-neighbour outside the
// mask; the image edge is not a border). Returns new RGBA bytes.
export function blendSegments(base, width, height, segments) {
  const out = new Uint8ClampedArray(base);
  for (const { mask, colour } of segments) {
    if (!mask.area) continue;
    const { x0, y0, w, h, data } = mask;
    const [r, g, b] = colour;
    const has = (x, y) => x >= 0 && y >= 0 && x < w && y < h && data[y * w + x] === 1;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        if (!data[y * w + x]) continue;
        const X = x + x0, Y = y + y0, j = (Y * width + X) * 4;
        const edge =
          (Y > 0 && !has(x, y - 1)) || (Y < height - 1 && !has(x, y + 1)) ||
          (X > 0 && !has(x - 1, y)) || (X < width - 1 && !has(x + 1, y));
        out[j] = edge ? r : Math.floor((1 - ALPHA) * base[j] + ALPHA * r);
        out[j + 1] = edge ? g : Math.floor((1 - ALPHA) * base[j + 1] + ALPHA * g);
        out[j + 2] = edge ? b : Math.floor((1 - ALPHA) * base[j + 2] + ALPHA * b);
      }
    }
  }
  return out;
}
