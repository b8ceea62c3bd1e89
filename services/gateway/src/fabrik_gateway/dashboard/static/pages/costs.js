// Costs: spend per day, per project over time and per model (GET /api/v1/costs), budgets and
// their alert levels (GET /api/v1/budgets).
import { api } from "../api.js";
import { bars, lines, stackedColumns } from "../charts.js";
import { clear, emptyRow, errorBox, h, money, num } from "../ui.js";

const TOP_PROJECTS = 6;

function days(from, count) {
  const out = [];
  for (let i = 0; i < count; i += 1) out.push(new Date(from.getTime() + i * 86400000).toISOString().slice(0, 10));
  return out;
}

function usd(v) {
  const n = Number(v || 0);
  if (n === 0) return "$0";
  if (n < 1) return money(n);
  return `$${n.toLocaleString(undefined, { maximumFractionDigits: 0 })}`;
}

function levelBadge(level) {
  const text = { none: "no limit", ok: "ok", warning: "warning", limit: "limit reached" }[level] || level;
  return h(`span.badge.level-${level}`, text);
}

function budgetLine(line) {
  if (line.limit_usd === null) return h("span", money(line.spent_usd), h("span.muted", " spent, no limit"));
  const pct = Math.min(100, 100 * (line.used || 0));
  const fill = h("span.fill");
  fill.style.width = `${pct}%`;
  return h(
    "span.budget",
    h(`span.progress.gauge`, { role: "meter", "aria-valuemin": "0", "aria-valuemax": String(line.limit_usd), "aria-valuenow": String(Number(line.spent_usd)), "aria-label": `${money(line.spent_usd)} of ${money(line.limit_usd)}` }, h(`span.bar.${line.level === "limit" ? "full" : line.level === "warning" ? "high" : "ok"}`, fill), h("span.pct", `${money(line.spent_usd)} / ${money(line.limit_usd)}`)),
    " ",
    levelBadge(line.level),
    h("span.muted", ` projected ${money(line.projected_usd)}`),
  );
}

export function costsPage(root) {
  // Two charts side by side from 1,056 px of room on (see .charts in style.css), else one.
  const chartSize = () => (charts.clientWidth >= 1056 ? (charts.clientWidth - 16) / 2 : charts.clientWidth);
  const range = h("select#c-range", h("option", { value: "7" }, "last 7 days"), h("option", { value: "30" }, "last 30 days"), h("option", { value: "90" }, "last 90 days"));
  range.value = "30";
  const totals = h("div.totals");
  const charts = h("div.charts");
  const models = h("div");
  const budgets = h("tbody");
  const budgetNote = h("p.muted");
  root.append(
    h("div.title-row", h("h1", "Costs"), h("div.field.inline", h("label", { for: "c-range" }, "Range"), range)),
    totals,
    h("section.card", { "aria-labelledby": "h-spend" }, h("h2#h-spend", "Spend over time"), charts),
    h("section.card", { "aria-labelledby": "h-models" }, h("h2#h-models", "Spend per model"), models),
    h(
      "section.card",
      { "aria-labelledby": "h-budgets" },
      h("h2#h-budgets", "Budgets this month"),
      budgetNote,
      h("div.table-wrap", h("table", h("thead", h("tr", ["Scope", "LLM", "Compute and storage", "Blocked"].map((t) => h("th", { scope: "col" }, t)))), budgets)),
    ),
  );

  let generation = 0;
  async function load() {
    const mine = ++generation;
    const count = Number(range.value);
    const today = new Date();
    const start = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - count + 1));
    const labels = days(start, count);
    const query = { from: start.toISOString() };
    clear(charts).append(h("p.muted", "Loading…"));
    try {
      const [byDay, byProject, byModel] = await Promise.all([
        api("costs", { query: { ...query, group_by: "day" } }),
        api("costs", { query: { ...query, group_by: "project" } }),
        api("costs", { query: { ...query, group_by: "model" } }),
      ]);
      const top = byProject.rows.filter((r) => r.group).slice(0, TOP_PROJECTS);
      const perProject = await Promise.all(top.map((r) => api("costs", { query: { ...query, group_by: "day", project: r.group } })));
      if (mine !== generation) return;
      const t = byDay.totals;
      clear(totals).append(
        h("div.stat", h("span.label", "Total"), h("span.value", money(t.total_cost_usd))),
        h("div.stat", h("span.label", "LLM"), h("span.value", money(t.llm_cost_usd))),
        h("div.stat", h("span.label", "Compute"), h("span.value", money(t.compute_cost_usd))),
        h("div.stat", h("span.label", "Storage"), h("span.value", money(t.storage_cost_usd))),
      );
      const at = (rows, key) => labels.map((d) => Number((rows.find((r) => r.group === d) || {})[key] || 0));
      clear(charts);
      if (!byDay.rows.length) charts.append(h("p.muted", "No spend recorded in this range."));
      else {
        charts.append(
          stackedColumns(
            "Spend per day (UTC)",
            labels,
            [
              { name: "LLM", values: at(byDay.rows, "llm_cost_usd"), color: 0 },
              { name: "Compute", values: at(byDay.rows, "compute_cost_usd"), color: 1 },
              { name: "Storage", values: at(byDay.rows, "storage_cost_usd"), color: 2 },
            ],
            usd,
            chartSize(),
          ),
        );
        if (top.length) {
          charts.append(lines(`Spend per day of the ${top.length} most expensive projects`, labels, top.map((r, i) => ({ name: r.group, values: at(perProject[i].rows, "total_cost_usd"), color: i })), usd, chartSize()));
        }
      }
      clear(models);
      const modelRows = byModel.rows.filter((r) => Number(r.llm_cost_usd) > 0 || r.calls > 0);
      if (!modelRows.length) models.append(h("p.muted", "No LLM calls in this range."));
      else {
        models.append(bars("LLM spend per model", modelRows.slice(0, 12).map((r) => ({ label: r.group || "unknown", value: Number(r.llm_cost_usd) })), usd, models.clientWidth));
        models.append(
          h(
            "div.table-wrap",
            h(
              "table",
              h("thead", h("tr", ["Model", "Calls", "Runs", "Input tokens", "Output tokens", "Cost"].map((x) => h("th", { scope: "col" }, x)))),
              h("tbody", modelRows.map((r) => h("tr", h("td", r.group || "unknown"), h("td.num", num(r.calls)), h("td.num", num(r.runs)), h("td.num", num(r.input_tokens)), h("td.num", num(r.output_tokens)), h("td.num", money(r.llm_cost_usd))))),
            ),
          ),
        );
      }
    } catch (err) {
      if (mine !== generation) return;
      clear(totals);
      clear(models);
      clear(charts).append(err.status === 503 ? h("div.notice.warn", { role: "alert" }, h("strong", "Costs are unavailable: "), err.message) : errorBox(err, "costs"));
    }
  }

  async function loadBudgets() {
    try {
      const answer = await api("budgets");
      budgetNote.textContent = `Period ${answer.period} (UTC month).`;
      clear(budgets);
      if (!answer.budgets.length) budgets.append(h("tr.empty", h("td", { colSpan: 4 }, "No budgets are set. Set one with ", h("code", "fabrik budget set"), " or ", h("code", "PUT /api/v1/budgets"), ".")));
      for (const b of answer.budgets) {
        budgets.append(h("tr", h("td", b.scope === "global" ? h("strong", "all projects") : b.project), h("td", budgetLine(b.llm)), h("td", budgetLine(b.compute)), h("td", b.blocked ? h("span.badge.level-limit", "LLM calls refused") : "no")));
      }
    } catch (err) {
      clear(budgets).append(h("tr", h("td", { colSpan: 4 }, err.status === 503 ? h("div.notice.warn", "Budgets are unavailable: ", err.message) : errorBox(err, "budgets"))));
    }
  }

  range.addEventListener("change", load);
  load();
  loadBudgets();
  return () => {
    generation += 1;
  };
}
