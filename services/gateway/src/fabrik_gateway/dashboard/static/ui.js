// DOM helpers and formatting. Text always goes in as text nodes: nothing from the API is parsed as HTML.

/** h("tag.class#id", {attrs, on: {event: fn}}, ...children) */
export function h(spec, attrs, ...children) {
  const m = /^([a-z0-9-]+)?((?:[.#][\w-]+)*)$/i.exec(spec);
  const el = document.createElement((m && m[1]) || "div");
  if (m && m[2]) {
    for (const part of m[2].match(/[.#][\w-]+/g)) {
      if (part[0] === ".") el.classList.add(part.slice(1));
      else el.id = part.slice(1);
    }
  }
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "on") for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

// ------------------------------------------------------------------ formatting

export function shortId(id) {
  return id ? id.slice(-8).toLowerCase() : "";
}

export function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function fmtClock(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleTimeString(undefined, { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function age(iso, now = Date.now()) {
  if (!iso) return "—";
  return fmtDuration((now - new Date(iso).getTime()) / 1000);
}

export function between(startIso, endIso) {
  if (!startIso) return null;
  const end = endIso ? new Date(endIso).getTime() : Date.now();
  return (end - new Date(startIso).getTime()) / 1000;
}

export function money(value) {
  const n = Number(value || 0);
  if (n === 0) return "$0";
  // Costs are exact to the nano-dollar; below a cent, two significant digits.
  if (Math.abs(n) < 1e-9) return n > 0 ? "<$0.000000001" : "-<$0.000000001";
  if (Math.abs(n) < 0.01) return `$${Number(n.toPrecision(2)).toFixed(Math.min(10, 1 - Math.floor(Math.log10(Math.abs(n)))))}`;
  return `$${n.toFixed(2)}`;
}

export function num(n) {
  return Number(n || 0).toLocaleString();
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(v >= 10 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out", "budget_exceeded"]);
export const STATES = ["queued", "starting", "running", "cancelling", ...TERMINAL];

export function stateBadge(state) {
  return h(`span.badge.s-${state}`, { title: `state: ${state}` }, state.replace("_", " "));
}

/** The scheduler's health judgement when it is not simply healthy (nothing otherwise). */
export function healthBadge(run) {
  const health = run.health;
  if (!health || !health.state || health.state === "healthy") return null;
  return h(`span.badge.health.hl-${health.state}`, { title: health.message || health.reason || `health: ${health.state}` }, health.state);
}

export function progressBar(progress) {
  const total = progress && progress.total;
  const done = progress && progress.finished;
  if (!total) return h("span.muted", progress && progress.phase ? progress.phase : "—");
  const pct = Math.min(100, Math.round((100 * (done || 0)) / total));
  const fill = h("span.fill");
  fill.style.width = `${pct}%`;
  return h(
    "span.progress",
    { role: "progressbar", "aria-valuemin": "0", "aria-valuemax": String(total), "aria-valuenow": String(done || 0), "aria-label": `${done || 0} of ${total}` },
    h("span.bar", fill),
    h("span.pct", `${pct}%`),
  );
}

// ------------------------------------------------------------------ feedback

export function toast(text, kind = "info") {
  const box = document.getElementById("toasts");
  const item = h(`div.toast.${kind}`, text);
  box.append(item);
  setTimeout(() => item.remove(), 6000);
}

/** A modal confirmation; resolves true when confirmed. */
export function confirmDialog(title, body, confirmLabel, danger = false) {
  return new Promise((resolve) => {
    const dialog = h(
      "dialog.confirm",
      { "aria-labelledby": "confirm-title" },
      h("h2#confirm-title", title),
      h("p", body),
    );
    const cancel = h("button.btn", { type: "button" }, "Keep it");
    const ok = h(`button.btn${danger ? ".danger" : ".primary"}`, { type: "button" }, confirmLabel);
    dialog.append(h("div.actions", cancel, ok));
    const done = (value) => {
      dialog.close();
      dialog.remove();
      resolve(value);
    };
    cancel.addEventListener("click", () => done(false));
    ok.addEventListener("click", () => done(true));
    dialog.addEventListener("cancel", (e) => {
      e.preventDefault();
      done(false);
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

/** An error box for a failed API call: 403 names the role needed, 404 says what is missing. */
export function errorBox(err, what) {
  if (err && err.status === 403) {
    return h(
      "div.notice.error",
      { role: "alert" },
      h("strong", "Not allowed. "),
      `${err.message.replace(/\.$/, "")}. `,
      "Ask an admin for a token with a higher role (viewer reads, developer submits, cancels and resumes, admin manages tokens).",
    );
  }
  if (err && err.status === 503) {
    return h("div.notice.warn", { role: "alert" }, h("strong", `${what} is unavailable right now. `), err.message);
  }
  return h("div.notice.error", { role: "alert" }, h("strong", `Could not load ${what}. `), err ? err.message : "");
}

export function emptyRow(cols, text) {
  return h("tr.empty", h("td", { colSpan: cols }, text));
}

/** A link that the client-side router handles. */
export function link(href, ...children) {
  let attrs = {};
  if (children.length && children[0] && typeof children[0] === "object" && !(children[0] instanceof Node) && !Array.isArray(children[0])) {
    attrs = children.shift();
  }
  return h("a", { ...attrs, href, dataset: { link: "" } }, ...children);
}
