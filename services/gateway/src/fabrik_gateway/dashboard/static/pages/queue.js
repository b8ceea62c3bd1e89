// Queue: dispatch order, position, who is ahead, ETA; per-project usage against quota.
import { api } from "../api.js";
import { LiveStream, liveIndicator } from "../live.js";
import { bytes, clear, emptyRow, errorBox, fmtDuration, fmtTime, h, link, shortId } from "../ui.js";

function gauge(used, limit, fmt) {
  if (limit === null || limit === undefined) return h("span", fmt(used), h("span.muted", " (no limit)"));
  const pct = limit > 0 ? Math.min(100, (100 * used) / limit) : 100;
  const fill = h("span.fill");
  fill.style.width = `${pct}%`;
  const level = pct >= 100 ? "full" : pct >= 80 ? "high" : "ok";
  return h(
    "span.progress.gauge",
    { role: "meter", "aria-valuemin": "0", "aria-valuemax": String(limit), "aria-valuenow": String(used), "aria-label": `${fmt(used)} of ${fmt(limit)}` },
    h(`span.bar.${level}`, fill),
    h("span.pct", `${fmt(used)} / ${fmt(limit)}`),
  );
}

function usageRow(name, u, l) {
  return h(
    "tr",
    h("td", name),
    h("td", gauge(u.runs, l.runs, String)),
    h("td", gauge(u.cpu, l.cpu, (v) => `${Math.round(v * 100) / 100}`)),
    h("td", gauge(u.memory, l.memory, bytes)),
  );
}

export function queuePage(root) {
  const indicator = liveIndicator();
  const summary = h("p.muted");
  const body = h("tbody");
  const usage = h("tbody");
  const errorSlot = h("div");
  root.append(
    h("div.title-row", h("h1", "Queue"), indicator.el),
    summary,
    errorSlot,
    h(
      "section.card",
      { "aria-labelledby": "h-order" },
      h("h2#h-order", "Dispatch order"),
      h(
        "div.table-wrap",
        h("table", h("thead", h("tr", ["#", "Run", "Project", "Priority", "Ahead", "Starts in", "Estimated start"].map((t) => h("th", { scope: "col" }, t)))), body),
      ),
    ),
    h(
      "section.card",
      { "aria-labelledby": "h-usage" },
      h("h2#h-usage", "Usage against quota"),
      h("div.table-wrap", h("table", h("thead", h("tr", ["Project", "Running runs", "CPU", "Memory"].map((t) => h("th", { scope: "col" }, t)))), usage)),
    ),
  );
  let timer = null;
  let controller = null;

  async function load() {
    timer = null;
    if (controller) controller.abort();
    controller = new AbortController();
    try {
      const q = await api("queue", { query: { limit: 1000 }, signal: controller.signal });
      clear(errorSlot);
      summary.textContent = q.taken_at
        ? `${q.total} queued, ${q.running} running · scheduler snapshot ${fmtTime(q.taken_at)}`
        : "The scheduler has not published a queue snapshot yet.";
      clear(body);
      if (!q.items.length) body.append(emptyRow(7, "Nothing is waiting."));
      q.items.forEach((item, i) => {
        const ahead = q.items.slice(Math.max(0, i - 3), i).map((a) => link(`/runs/${a.run_id}`, { class: "mono", title: a.run_id }, shortId(a.run_id)));
        body.append(
          h(
            "tr",
            h("td.num", String(item.position)),
            h("td.mono", link(`/runs/${item.run_id}`, { title: item.run_id }, shortId(item.run_id))),
            h("td", item.project),
            h("td", h(`span.prio.${item.priority}`, item.priority)),
            h("td", item.position - 1 === 0 ? "none" : h("span", `${item.position - 1}`, ahead.length ? h("span.muted", " incl. ") : null, ahead.flatMap((a, j) => (j ? [", ", a] : [a])))),
            h("td", item.eta_seconds === null ? h("span.muted", "unknown") : fmtDuration(item.eta_seconds)),
            h("td", fmtTime(item.eta)),
          ),
        );
      });
      clear(usage);
      const used = q.usage || {};
      const limits = q.limits || {};
      const projects = [...new Set([...Object.keys(used), ...Object.keys(limits).filter((k) => k !== "cluster")])].sort();
      const zero = { runs: 0, cpu: 0, memory: 0 };
      if (limits.cluster) {
        const total = Object.values(used).reduce((a, u) => ({ runs: a.runs + u.runs, cpu: a.cpu + u.cpu, memory: a.memory + u.memory }), zero);
        usage.append(usageRow(h("strong", "whole cluster"), total, limits.cluster));
      }
      if (!projects.length) usage.append(emptyRow(4, "No project uses capacity or waits right now."));
      for (const p of projects) usage.append(usageRow(p, used[p] || zero, limits[p] || {}));
    } catch (err) {
      if (err.name === "AbortError") return;
      clear(errorSlot).append(errorBox(err, "the queue"));
    }
  }

  const stream = new LiveStream(
    { types: "run.queued,run.dispatched,run.state_changed" },
    () => {
      if (!timer) timer = setTimeout(load, 500);
    },
    (s, d) => indicator.set(s, d),
  );
  const poll = setInterval(load, 10000); // ETAs move with the scheduler's snapshots
  load();
  return () => {
    stream.close();
    clearInterval(poll);
    clearTimeout(timer);
    if (controller) controller.abort();
  };
}
