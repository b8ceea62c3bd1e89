// Runs: a live, filterable, paged table over GET /api/v1/runs and the live stream.
import { api } from "../api.js";
import { LiveStream, liveIndicator } from "../live.js";
import { age, between, clear, emptyRow, errorBox, fmtDuration, fmtTime, h, healthBadge, link, money, progressBar, shortId, stateBadge, STATES, TERMINAL } from "../ui.js";

const ACTIVE = "queued,starting,running,cancelling";
const FINISHED = [...TERMINAL].join(",");
const COLUMNS = [
  ["run_id", "Run"],
  ["state", "State"],
  ["project", "Project"],
  ["spec_id", "Spec"],
  ["phase", "Phase / task"],
  ["progress", "Progress"],
  ["created_at", "Age"],
  ["duration", "Duration"],
  ["cost_usd", "Cost"],
];

function sortValue(run, key) {
  switch (key) {
    case "phase":
      return `${run.progress.phase || ""} ${run.progress.task || ""}`;
    case "progress":
      return run.progress.total ? run.progress.finished / run.progress.total : -1;
    case "duration":
      return between(run.started_at, run.finished_at) ?? -1;
    case "cost_usd":
      return Number(run.cost_usd || 0);
    default:
      return run[key] ?? "";
  }
}

export function runsPage(root, app) {
  const params = new URLSearchParams(location.search);
  const filters = {
    project: params.get("project") || "",
    state: params.get("state") || "",
    health: params.get("health") || "",
    label: params.get("label") || "",
    q: params.get("q") || "",
    order: params.get("order") === "oldest" ? "oldest" : "newest",
    limit: params.get("limit") || "50",
  };
  let cursors = [null]; // cursor of each page visited; the last is the current page's
  let next = null;
  let runs = [];
  let sortKey = null; // client-side sort of the loaded page; null: the API's order
  let sortDir = 1;
  let controller = null;
  let refreshTimer = null;
  const pendingRuns = new Set();

  const indicator = liveIndicator();
  const status = h("p.muted.count", { "aria-live": "polite" });
  const projectSelect = h("select#f-project", { name: "project" }, h("option", { value: "" }, "all projects"));
  const stateSelect = h(
    "select#f-state",
    { name: "state" },
    h("option", { value: "" }, "any state"),
    h("option", { value: ACTIVE }, "active (queued … cancelling)"),
    h("option", { value: FINISHED }, "finished"),
    STATES.map((s) => h("option", { value: s }, s.replace("_", " "))),
  );
  const healthSelect = h(
    "select#f-health",
    { name: "health" },
    h("option", { value: "" }, "any health"),
    h("option", { value: "stalled,healing,failed" }, "unhealthy"),
    ["healthy", "stalled", "healing", "failed"].map((s) => h("option", { value: s }, s)),
  );
  healthSelect.value = filters.health;
  const labelInput = h("input#f-label", { name: "label", placeholder: "key=value", autocomplete: "off", value: filters.label });
  const textInput = h("input#f-q", { name: "q", type: "search", placeholder: "id, spec, requester, message…", autocomplete: "off", value: filters.q });
  const orderSelect = h("select#f-order", { name: "order" }, h("option", { value: "newest" }, "newest first"), h("option", { value: "oldest" }, "oldest first"));
  const limitSelect = h("select#f-limit", { name: "limit" }, ["25", "50", "100", "200"].map((n) => h("option", { value: n }, n)));
  stateSelect.value = filters.state;
  if (stateSelect.value !== filters.state) {
    stateSelect.append(h("option", { value: filters.state }, filters.state));
    stateSelect.value = filters.state;
  }
  orderSelect.value = filters.order;
  limitSelect.value = filters.limit;

  const field = (id, text, control) => h("div.field", h("label", { for: id }, text), control);
  const filterForm = h(
    "form.filters",
    { role: "search", on: { submit: (e) => { e.preventDefault(); apply(); } } },
    field("f-project", "Project", projectSelect),
    field("f-state", "State", stateSelect),
    field("f-health", "Health", healthSelect),
    field("f-label", "Label", labelInput),
    field("f-q", "Search", textInput),
    field("f-order", "Order", orderSelect),
    field("f-limit", "Per page", limitSelect),
  );
  let typing = null;
  for (const input of [labelInput, textInput]) {
    input.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(apply, 350);
    });
  }
  for (const select of [projectSelect, stateSelect, healthSelect, orderSelect, limitSelect]) select.addEventListener("change", apply);

  const thead = h("thead");
  const tbody = h("tbody");
  const table = h("table.runs", h("caption.sr-only", "Runs"), thead, tbody);
  const prev = h("button.btn", { type: "button", on: { click: () => { cursors.pop(); load(); } } }, "← Newer");
  const nextBtn = h("button.btn", { type: "button", on: { click: () => { cursors.push(next); load(); } } }, "Older →");
  const pageInfo = h("span.muted");
  const pager = h("nav.pager", { "aria-label": "Pages of runs" }, prev, pageInfo, nextBtn);
  const errorSlot = h("div");

  root.append(
    h("div.title-row", h("h1", "Runs"), indicator.el, app.can("developer") ? link("/submit", "New run") : null),
    filterForm,
    errorSlot,
    h("div.table-wrap", table),
    h("div.table-foot", status, pager),
  );
  const newRunLink = root.querySelector(".title-row a");
  if (newRunLink) newRunLink.className = "btn primary";

  function renderHead() {
    clear(thead);
    const row = h("tr");
    for (const [key, label] of COLUMNS) {
      let aria = "none";
      let arrow = "";
      if (key === "created_at" && sortKey === null) {
        aria = filters.order === "newest" ? "ascending" : "descending";
        arrow = filters.order === "newest" ? " ↓" : " ↑";
      } else if (sortKey === key) {
        aria = sortDir > 0 ? "ascending" : "descending";
        arrow = sortDir > 0 ? " ↑" : " ↓";
      }
      const button = h(
        "button.sort",
        {
          type: "button",
          title: key === "created_at" ? "Order all runs by age" : "Sort the rows of this page",
          on: { click: () => sortBy(key) },
        },
        label,
        arrow,
      );
      row.append(h("th", { scope: "col", "aria-sort": aria }, button));
    }
    thead.append(row);
  }

  function sortBy(key) {
    if (key === "created_at") {
      sortKey = null;
      filters.order = filters.order === "newest" ? "oldest" : "newest";
      orderSelect.value = filters.order;
      apply();
      return;
    }
    if (sortKey === key) sortDir = -sortDir;
    else {
      sortKey = key;
      sortDir = key === "cost_usd" || key === "progress" || key === "duration" ? -1 : 1;
    }
    renderRows();
  }

  function rowOf(run) {
    const tr = h(
      "tr",
      { dataset: { runId: run.run_id, state: run.state } },
      h("td.mono", link(`/runs/${run.run_id}`, { title: run.run_id }, shortId(run.run_id))),
      h("td", stateBadge(run.state), healthBadge(run), run.reason && run.reason !== run.state ? h("div.reason", run.reason) : null),
      h("td", run.project, run.env && run.env !== "dev" ? h("span.muted", ` / ${run.env}`) : null),
      h("td", run.spec_id || h("span.muted", "—")),
      h("td.ptask", run.progress.phase || "", run.progress.task ? h("span.muted", ` ${run.progress.task}`) : "", run.state === "queued" && run.queue && run.queue.position ? h("span.muted", `#${run.queue.position} in queue`) : null),
      h("td", progressBar(run.progress)),
      h("td.age", { title: fmtTime(run.created_at), dataset: { since: run.created_at } }, age(run.created_at)),
      h("td", fmtDuration(between(run.started_at, run.finished_at))),
      h("td.num", money(run.cost_usd)),
    );
    tr.addEventListener("click", (e) => {
      if (e.target.closest("a, button")) return;
      app.navigate(`/runs/${run.run_id}`);
    });
    return tr;
  }

  function renderRows() {
    const focused = document.activeElement && document.activeElement.closest ? document.activeElement.closest("tbody tr") : null;
    const focusedId = focused && tbody.contains(focused) ? focused.dataset.runId : null;
    renderHead();
    clear(tbody);
    let shown = runs;
    if (sortKey) {
      shown = [...runs].sort((a, b) => {
        const x = sortValue(a, sortKey);
        const y = sortValue(b, sortKey);
        return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
      });
    }
    if (!shown.length) tbody.append(emptyRow(COLUMNS.length, anyFilter() ? "No run matches these filters." : "No runs yet."));
    for (const run of shown) tbody.append(rowOf(run));
    if (focusedId) {
      const again = tbody.querySelector(`tr[data-run-id="${CSS.escape(focusedId)}"] a`);
      if (again) again.focus({ preventScroll: true });
    }
    const page = cursors.length;
    pageInfo.textContent = `page ${page}`;
    prev.disabled = page <= 1;
    nextBtn.disabled = !next;
    status.textContent = `${runs.length} run${runs.length === 1 ? "" : "s"} on this page${sortKey ? " (sorted within the page)" : ""}`;
  }

  function anyFilter() {
    return Boolean(filters.project || filters.state || filters.health || filters.label || filters.q);
  }

  function apply() {
    filters.project = projectSelect.value;
    filters.state = stateSelect.value;
    filters.health = healthSelect.value;
    filters.label = labelInput.value.trim();
    filters.q = textInput.value.trim();
    filters.order = orderSelect.value;
    filters.limit = limitSelect.value;
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries(filters)) {
      if (v && !(k === "order" && v === "newest") && !(k === "limit" && v === "50")) qs.set(k, v);
    }
    const url = `/${qs.toString() ? `?${qs}` : ""}`;
    history.replaceState(null, "", url);
    cursors = [null];
    load();
    reconnect();
  }

  async function load() {
    if (controller) controller.abort();
    controller = new AbortController();
    const cursor = cursors[cursors.length - 1];
    try {
      const page = await api("runs", {
        query: {
          project: filters.project,
          state: filters.state,
          health: filters.health,
          label: filters.label,
          q: filters.q,
          order: filters.order === "oldest" ? "oldest" : undefined,
          limit: filters.limit,
          cursor,
        },
        signal: controller.signal,
      });
      clear(errorSlot);
      for (const input of filterForm.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
      runs = page.items;
      next = page.next_cursor;
      renderRows();
    } catch (err) {
      if (err.name === "AbortError") return;
      clear(errorSlot).append(errorBox(err, "runs"));
      if (err.status === 400) {
        for (const e of err.fieldErrors) {
          const input = filterForm.querySelector(`[name="${CSS.escape(e.field)}"]`);
          if (input) input.setAttribute("aria-invalid", "true");
        }
      }
    }
  }

  async function loadProjects() {
    try {
      const answer = await api("projects");
      for (const p of answer.items) projectSelect.append(h("option", { value: p.project }, `${p.project} (${p.total})`));
      if (filters.project && ![...projectSelect.options].some((o) => o.value === filters.project)) projectSelect.append(h("option", { value: filters.project }, filters.project));
      projectSelect.value = filters.project;
    } catch (err) {
      clear(errorSlot).append(errorBox(err, "projects"));
    }
  }

  // ---------------------------------------------------------------- live updates
  function onEvent(msg) {
    const runId = msg.event && msg.event.run_id;
    if (!runId) return;
    const project = msg.event.project;
    if (project && ![...projectSelect.options].some((o) => o.value === project)) {
      projectSelect.append(h("option", { value: project }, project));
    }
    const onFirstPage = cursors.length === 1 && filters.order === "newest";
    if (onFirstPage) {
      scheduleRefresh();
      return;
    }
    if (runs.some((r) => r.run_id === runId)) {
      pendingRuns.add(runId);
      scheduleRefresh();
    }
  }

  function scheduleRefresh() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(refresh, 500);
  }

  async function refresh() {
    refreshTimer = null;
    if (cursors.length === 1 && filters.order === "newest") {
      pendingRuns.clear();
      await load();
      return;
    }
    const ids = [...pendingRuns];
    pendingRuns.clear();
    for (const id of ids) {
      try {
        const run = await api(`runs/${id}`);
        runs = runs.map((r) => (r.run_id === id ? run : r));
      } catch (err) {
        if (err.status !== 404) throw err;
        runs = runs.filter((r) => r.run_id !== id);
      }
    }
    renderRows();
  }

  let stream = null;
  function reconnect() {
    if (stream) stream.close();
    stream = new LiveStream(
      { project: filters.project, types: "run.requested,run.queued,run.state_changed,run.progress,run.finished,run.dispatched,run.started" },
      onEvent,
      (s, detail) => indicator.set(s, detail),
    );
  }

  const ticker = setInterval(() => {
    for (const cell of tbody.querySelectorAll("td.age")) cell.textContent = age(cell.dataset.since);
  }, 5000);

  renderHead();
  loadProjects();
  load();
  reconnect();
  return () => {
    clearInterval(ticker);
    clearTimeout(refreshTimer);
    clearTimeout(typing);
    if (controller) controller.abort();
    stream.close();
  };
}
