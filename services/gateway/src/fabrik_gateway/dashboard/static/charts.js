// Small SVG charts drawn from real data: stacked columns over days, lines over days, bars.
const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) if (c) el.append(c);
  return el;
}

function text(x, y, value, attrs = {}) {
  const t = svg("text", { x, y, ...attrs });
  t.textContent = value;
  return t;
}

/** The drawing's width in user units: the space it gets on screen (so text keeps its size). */
function chartWidth(available) {
  return Math.round(Math.max(300, Math.min(720, available || 720)));
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 4, 8, 10]) if (m * p >= v * (1 - 1e-9)) return m * p;
  return 10 * p;
}

/** Room for the longest tick label of an axis from 0 to `max`. */
function axisRoom(max, fmt) {
  let longest = 0;
  for (let i = 0; i <= 4; i += 1) longest = Math.max(longest, fmt((max * i) / 4).length);
  return Math.ceil(longest * 7.4 + 12);
}

function axis(g, { left, top, width, height, max, fmt }) {
  for (let i = 0; i <= 4; i += 1) {
    const y = top + height - (height * i) / 4;
    g.append(svg("line", { x1: left, x2: left + width, y1: y, y2: y, class: "grid" }));
    g.append(text(left - 6, y + 4, fmt((max * i) / 4), { class: "tick", "text-anchor": "end" }));
  }
}

function legend(series) {
  const box = document.createElement("ul");
  box.className = "legend";
  series.forEach((s, i) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = `swatch c${s.color ?? i}`;
    li.append(sw, document.createTextNode(s.name));
    box.append(li);
  });
  return box;
}

function frame(title, chart, series) {
  const fig = document.createElement("figure");
  fig.className = "chart";
  const cap = document.createElement("figcaption");
  cap.textContent = title;
  fig.append(cap, chart);
  if (series) fig.append(legend(series));
  return fig;
}

/**
 * Columns over categories (days), each stacked from `series`.
 * @param {string[]} labels  x categories
 * @param {{name: string, values: number[]}[]} series
 */
export function stackedColumns(title, labels, series, fmt, available) {
  const totals = labels.map((_, i) => series.reduce((a, s) => a + (s.values[i] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  const W = chartWidth(available), H = 240, left = axisRoom(max, fmt), top = 12, bottom = 28, right = 8;
  const width = W - left - right, height = H - top - bottom;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${labels.length} days, highest ${fmt(Math.max(0, ...totals))}` });
  axis(g, { left, top, width, height, max, fmt });
  const step = width / Math.max(1, labels.length);
  const bw = Math.max(2, step * 0.7);
  labels.forEach((label, i) => {
    let y = top + height;
    series.forEach((s, k) => {
      const v = s.values[i] || 0;
      if (v <= 0) return;
      const hgt = (height * v) / max;
      y -= hgt;
      const r = svg("rect", { x: left + i * step + (step - bw) / 2, y, width: bw, height: hgt, class: `c${s.color ?? k}` });
      r.append(svg("title", {}, document.createTextNode(`${label} ${s.name}: ${fmt(v)}`)));
      g.append(r);
    });
    const every = Math.ceil(labels.length / Math.max(2, Math.floor(W / 70)));
    if (i % every === 0) g.append(text(left + i * step + step / 2, H - 8, label.slice(5), { class: "tick", "text-anchor": "middle" }));
  });
  return frame(title, g, series);
}

/** One line per series over the same categories. */
export function lines(title, labels, series, fmt, available) {
  const max = niceMax(Math.max(0, ...series.flatMap((s) => s.values)));
  const W = chartWidth(available), H = 240, left = axisRoom(max, fmt), top = 12, bottom = 28, right = 8;
  const width = W - left - right, height = H - top - bottom;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${series.length} series over ${labels.length} days` });
  axis(g, { left, top, width, height, max, fmt });
  const x = (i) => left + (labels.length <= 1 ? width / 2 : (width * i) / (labels.length - 1));
  const y = (v) => top + height - (height * v) / max;
  series.forEach((s, k) => {
    const d = s.values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v || 0).toFixed(1)}`).join("");
    g.append(svg("path", { d, class: `line c${s.color ?? k}` }));
    s.values.forEach((v, i) => {
      if (!v) return;
      const dot = svg("circle", { cx: x(i), cy: y(v), r: 3, class: `c${s.color ?? k}` });
      dot.append(svg("title", {}, document.createTextNode(`${labels[i]} ${s.name}: ${fmt(v)}`)));
      g.append(dot);
    });
  });
  const every = Math.ceil(labels.length / Math.max(2, Math.floor(W / 70)));
  labels.forEach((label, i) => {
    if (i % every === 0) g.append(text(x(i), H - 8, label.slice(5), { class: "tick", "text-anchor": "middle" }));
  });
  return frame(title, g, series);
}

/** Horizontal bars, one per row. */
export function bars(title, rows, fmt, available) {
  const W = chartWidth(available), rowH = 26, left = W < 500 ? 110 : 180, right = 80;
  const H = Math.max(1, rows.length) * rowH + 8;
  const max = niceMax(Math.max(0, ...rows.map((r) => r.value)));
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "bars", role: "img", "aria-label": `${title}: ${rows.length} rows` });
  rows.forEach((r, i) => {
    const y = 4 + i * rowH;
    const w = ((W - left - right) * r.value) / max;
    g.append(text(left - 8, y + 17, r.label.length > left / 7 ? `${r.label.slice(0, Math.floor(left / 7) - 1)}…` : r.label, { class: "tick", "text-anchor": "end" }));
    const rect = svg("rect", { x: left, y: y + 4, width: Math.max(1, w), height: rowH - 8, class: `c${i % 8}` });
    rect.append(svg("title", {}, document.createTextNode(`${r.label}: ${fmt(r.value)}`)));
    g.append(rect);
    g.append(text(left + w + 6, y + 17, fmt(r.value), { class: "tick" }));
  });
  return frame(title, g);
}
