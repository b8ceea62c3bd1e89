// Run: header, progress timeline, live logs, lifecycle events, LLM calls, cancel and resume.
import { api } from "../api.js";
import { LiveStream, liveIndicator } from "../live.js";
import { age, between, clear, confirmDialog, emptyRow, errorBox, fmtClock, fmtDuration, fmtTime, h, healthBadge, link, money, num, progressBar, shortId, stateBadge, TERMINAL, toast } from "../ui.js";

const RESUMABLE = new Set(["failed", "timed_out", "cancelled"]);
// An imported run (requested_by "import:…") has no workspace or image digest here: the gateway
// refuses to resume it, so the button is not offered.
const resumable = (r) => RESUMABLE.has(r.state) && !(r.requested_by || "").startsWith("import:");
const MAX_LINES = 20000;

export function runPage(root, app, runId) {
  document.title = `Run ${shortId(runId)} · Fabrik`;
  let run = null;
  let refreshTimer = null;
  let llmTimer = null;
  const seenEvents = new Set();
  const events = [];
  const lines = new Map(); // "attempt:line" → line
  let logOrder = [];
  let follow = true;
  let showTimes = true;
  let search = "";

  const indicator = liveIndicator();
  const header = h("section.card.run-header", { "aria-label": "Run" }, h("p.muted", "Loading…"));
  const actions = h("div.actions");
  const timeline = h("div.timeline");
  const eventsBody = h("tbody");
  const llmSlot = h("div", h("p.muted", "Loading…"));
  const logBox = h("div.log", { role: "log", "aria-live": "off", tabindex: "0", "aria-label": "Log lines" });
  const logStatus = h("span.muted");
  const followBox = h("input#log-follow", { type: "checkbox", checked: true });
  const timesBox = h("input#log-times", { type: "checkbox", checked: true });
  const searchInput = h("input#log-search", { type: "search", placeholder: "filter lines", autocomplete: "off" });
  followBox.addEventListener("change", () => {
    follow = followBox.checked;
    if (follow) logBox.scrollTop = logBox.scrollHeight;
  });
  timesBox.addEventListener("change", () => {
    showTimes = timesBox.checked;
    logBox.classList.toggle("no-times", !showTimes);
  });
  let searchTimer = null;
  searchInput.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      search = searchInput.value.trim().toLowerCase();
      renderLog();
    }, 200);
  });
  logBox.addEventListener("scroll", () => {
    const atBottom = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 24;
    if (!atBottom && follow && document.activeElement === logBox) {
      follow = false;
      followBox.checked = false;
    }
  });

  root.append(
    h("div.title-row", h("h1", "Run ", h("span.mono", { title: runId }, shortId(runId))), indicator.el, actions),
    header,
    h("section.card", { "aria-labelledby": "h-timeline" }, h("h2#h-timeline", "Progress"), timeline),
    h(
      "section.card",
      { "aria-labelledby": "h-logs" },
      h("div.section-head", h("h2#h-logs", "Logs"), logStatus),
      h(
        "div.log-tools",
        h("label.check", { for: "log-follow" }, followBox, " follow"),
        h("label.check", { for: "log-times" }, timesBox, " timestamps"),
        h("label.sr-only", { for: "log-search" }, "Search the log"),
        searchInput,
      ),
      logBox,
    ),
    h(
      "section.card",
      { "aria-labelledby": "h-events" },
      h("h2#h-events", "Lifecycle events"),
      h("div.table-wrap", h("table.events", h("thead", h("tr", h("th", { scope: "col" }, "Time"), h("th", { scope: "col" }, "Event"), h("th", { scope: "col" }, "Details"))), eventsBody)),
    ),
    h("section.card", { "aria-labelledby": "h-llm" }, h("h2#h-llm", "LLM calls"), llmSlot),
  );

  // ---------------------------------------------------------------- header and actions
  function kv(label, ...value) {
    return [h("dt", label), h("dd", ...value)];
  }

  function renderHeader() {
    const r = run;
    const res = r.resources || {};
    const queue = r.queue;
    clear(header).append(
      h("div.header-line", stateBadge(r.state), healthBadge(r), r.reason ? h("span.reason", r.reason) : null, r.message ? h("span.message", r.message) : null),
      h(
        "dl.facts",
        kv("Run id", h("span.mono", r.run_id)),
        kv("Project / env", `${r.project} / ${r.env}`),
        kv("Spec", r.spec_id || "—"),
        kv("Attempt", String(r.attempt)),
        kv("Priority", r.priority),
        kv("Resources", `${r.template ? `${r.template}: ` : ""}${res.cpu_request}/${res.memory_request} requested, ${res.cpu_limit}/${res.memory_limit} limit`),
        kv("Created", h("span", { title: r.created_at }, `${fmtTime(r.created_at)} (${age(r.created_at)} ago)`)),
        kv("Started", fmtTime(r.started_at)),
        kv("Finished", fmtTime(r.finished_at)),
        kv("Duration", fmtDuration(between(r.started_at, r.finished_at))),
        kv("Timeout", fmtDuration(r.timeout_seconds)),
        kv("Exit code", r.exit_code === null ? "—" : String(r.exit_code)),
        kv("Cost", money(r.cost_usd), r.budget_usd !== null && r.budget_usd !== undefined ? h("span.muted", ` of ${money(r.budget_usd)} budget`) : null),
        kv("Tokens", `${num(r.tokens.input)} in / ${num(r.tokens.output)} out`),
        kv("Image digest", r.image_digest ? h("span.mono.wrap", r.image_digest) : "—"),
        kv("Requested by", r.requested_by || "—"),
        r.health ? kv("Health", r.health.state, r.health.reason ? h("span.muted", ` ${r.health.reason}`) : null, r.health.message ? h("span.muted", ` — ${r.health.message}`) : null) : [],
        kv("Labels", Object.keys(r.labels).length ? Object.entries(r.labels).map(([k, v]) => h("span.tag", `${k}=${v}`)) : "—"),
        queue ? kv("Queue", queue.position ? `#${queue.position}, ${queue.ahead_count} ahead, starts ${queue.eta ? `~${fmtTime(queue.eta)}` : "when capacity frees"}` : "not placed yet") : [],
      ),
      h("div.header-progress", progressBar(r.progress), r.progress.message ? h("span.muted", ` ${r.progress.message}`) : null),
    );
    clear(actions);
    if (!app.can("developer", r.project)) return;
    if (!TERMINAL.has(r.state)) {
      actions.append(h("button.btn.danger", { type: "button", disabled: r.state === "cancelling", on: { click: cancel } }, r.state === "cancelling" ? "Cancelling…" : "Cancel run"));
    }
    if (resumable(r)) actions.append(h("button.btn.primary", { type: "button", on: { click: resume } }, "Resume run"));
  }

  async function cancel() {
    const ok = await confirmDialog("Cancel this run?", `Run ${shortId(run.run_id)} (${run.project}) will be stopped; its workspace is kept, so it can be resumed.`, "Cancel run", true);
    if (!ok) return;
    try {
      await api(`runs/${run.run_id}/cancel`, { method: "POST", body: { reason: "cancelled from the dashboard" } });
      toast("Cancel requested.");
      await loadRun();
    } catch (err) {
      toast(`Cancel failed: ${err.message}`, "error");
    }
  }

  async function resume() {
    const ok = await confirmDialog("Resume this run?", `Run ${shortId(run.run_id)} continues as attempt ${run.attempt + 1}, from its own checkpoint in the same workspace.`, "Resume run");
    if (!ok) return;
    try {
      await api(`runs/${run.run_id}/resume`, { method: "POST" });
      toast("Resume requested.");
      await loadRun();
    } catch (err) {
      toast(`Resume failed: ${err.message}`, "error");
    }
  }

  async function loadRun() {
    try {
      run = await api(`runs/${runId}`);
      renderHeader();
    } catch (err) {
      clear(header).append(err.status === 404 ? h("div.notice.error", { role: "alert" }, "No such run (or it belongs to a project you have no role in). ", link("/", "Back to runs")) : errorBox(err, "the run"));
      clear(actions);
    }
  }

  // ---------------------------------------------------------------- events and timeline
  function summary(e) {
    const ev = e.event || {};
    switch (e.type) {
      case "run.state_changed":
        return `${ev.from_state || "—"} → ${ev.to_state}${ev.reason ? ` (${ev.reason})` : ""}${ev.message ? `: ${ev.message}` : ""}`;
      case "run.progress":
        return [ev.phase, ev.task, ev.total ? `${ev.finished}/${ev.total}` : null, ev.message].filter(Boolean).join(" · ");
      case "run.queued":
        return ev.priority ? `priority ${ev.priority}` : "";
      case "run.finished":
        return [ev.outcome, ev.exit_code !== undefined && ev.exit_code !== null ? `exit ${ev.exit_code}` : null, ev.reason].filter(Boolean).join(", ");
      case "run.requested":
        return ev.requested_by ? `by ${ev.requested_by}` : "";
      case "run.cancel_requested":
        return ev.reason || "";
      default:
        return ev.attempt ? `attempt ${ev.attempt}` : "";
    }
  }

  function addEvent(e) {
    const id = (e.event && e.event.event_id) || `${e.seq}`;
    if (seenEvents.has(id)) return false;
    seenEvents.add(id);
    events.push(e);
    return true;
  }

  function renderEvents() {
    clear(eventsBody);
    if (!events.length) eventsBody.append(emptyRow(3, "No events yet."));
    for (const e of events) {
      eventsBody.append(h("tr", h("td.nowrap", { title: e.event && e.event.occurred_at }, fmtClock(e.event && e.event.occurred_at)), h("td", h("code", e.type)), h("td", summary(e))));
    }
    renderTimeline();
  }

  function renderTimeline() {
    const phases = [];
    for (const e of events) {
      if (e.type !== "run.progress" || !e.event.phase) continue;
      const at = new Date(e.event.occurred_at).getTime();
      let phase = phases[phases.length - 1];
      if (!phase || phase.name !== e.event.phase) {
        if (phase) phase.end = at;
        phase = { name: e.event.phase, start: at, end: null, tasks: [] };
        phases.push(phase);
      }
      if (e.event.task && phase.tasks[phase.tasks.length - 1] !== e.event.task) phase.tasks.push(e.event.task);
      phase.last = { finished: e.event.finished, total: e.event.total };
    }
    clear(timeline);
    if (!phases.length) {
      timeline.append(h("p.muted", run && TERMINAL.has(run.state) ? "The workload reported no progress." : "No progress reported yet."));
      return;
    }
    const finishedAt = run && run.finished_at ? new Date(run.finished_at).getTime() : Date.now();
    const first = phases[0].start;
    const span = Math.max(1, finishedAt - first);
    const bar = h("div.phases", { role: "list" });
    const list = h("ol.phase-list");
    phases.forEach((p, i) => {
      const end = p.end || finishedAt;
      const seg = h(`div.phase.p${i % 6}`, { role: "listitem", title: `${p.name}: ${fmtDuration((end - p.start) / 1000)}` }, h("span", p.name));
      seg.style.flexGrow = String(Math.max(0.02, (end - p.start) / span));
      bar.append(seg);
      const current = !p.end && run && !TERMINAL.has(run.state);
      list.append(
        h(
          "li",
          h("strong", p.name),
          h("span.muted", ` ${fmtClock(new Date(p.start).toISOString())}, ${fmtDuration((end - p.start) / 1000)}${current ? " so far" : ""}`),
          p.last && p.last.total ? h("span.muted", ` · ${p.last.finished}/${p.last.total}`) : null,
          p.tasks.length ? h("div.tasks", p.tasks.slice(-12).map((t) => h("span.tag", t)), p.tasks.length > 12 ? h("span.muted", ` +${p.tasks.length - 12} earlier`) : null) : null,
        ),
      );
    });
    timeline.append(bar, list);
  }

  async function loadEvents() {
    try {
      let after = 0;
      for (;;) {
        const page = await api(`runs/${runId}/events`, { query: { after: after || undefined, limit: 1000 } });
        page.items.forEach(addEvent);
        if (!page.next_cursor) break;
        after = page.next_cursor;
      }
      events.sort((a, b) => (a.seq || 0) - (b.seq || 0));
      renderEvents();
    } catch (err) {
      clear(eventsBody).append(h("tr", h("td", { colSpan: 3 }, errorBox(err, "events"))));
    }
  }

  // ---------------------------------------------------------------- logs
  function addLine(line) {
    const key = `${line.attempt}:${line.line}`;
    if (lines.has(key)) return false;
    lines.set(key, line);
    logOrder.push(line);
    return true;
  }

  function lineEl(line) {
    const el = h(`div.line.${line.stream === "stderr" ? "err" : "out"}`, h("span.ts", fmtClock(line.ts)), h("span.txt", line.text));
    return el;
  }

  function renderLog() {
    logOrder.sort((a, b) => a.attempt - b.attempt || a.line - b.line);
    if (logOrder.length > MAX_LINES) {
      for (const l of logOrder.splice(0, logOrder.length - MAX_LINES)) lines.delete(`${l.attempt}:${l.line}`);
    }
    clear(logBox);
    const shown = search ? logOrder.filter((l) => l.text.toLowerCase().includes(search)) : logOrder;
    const frag = document.createDocumentFragment();
    let attempt = null;
    for (const l of shown) {
      if (l.attempt !== attempt && logOrder[0] && logOrder[0].attempt !== logOrder[logOrder.length - 1].attempt) {
        frag.append(h("div.attempt", `attempt ${l.attempt}`));
      }
      attempt = l.attempt;
      frag.append(lineEl(l));
    }
    logBox.append(frag);
    if (!shown.length) logBox.append(h("div.muted.pad", search ? "No line matches." : "No log lines yet."));
    logStatus.textContent = search ? `${shown.length} of ${logOrder.length} lines` : `${logOrder.length} lines`;
    if (follow) logBox.scrollTop = logBox.scrollHeight;
  }

  function appendLines(newLines) {
    const added = newLines.filter(addLine);
    if (!added.length) return;
    const last = logOrder[logOrder.length - added.length - 1];
    const inOrder = !last || added.every((l, i) => i === 0 ? (l.attempt > last.attempt || (l.attempt === last.attempt && l.line > last.line)) : true);
    if (!inOrder || search || logBox.querySelector(".pad") || logOrder.length > MAX_LINES) {
      renderLog();
      return;
    }
    for (const l of added) logBox.append(lineEl(l));
    logStatus.textContent = `${logOrder.length} lines`;
    if (follow) logBox.scrollTop = logBox.scrollHeight;
  }

  async function loadLogs() {
    try {
      const answer = await api(`runs/${runId}/logs`, { query: { tail: 5000 } });
      answer.lines.forEach(addLine);
      renderLog();
      if (answer.truncated) logBox.prepend(h("div.muted.pad", "Earlier lines are not shown (the last 5,000 are)."));
    } catch (err) {
      clear(logBox).append(errorBox(err, "logs"));
    }
  }

  // ---------------------------------------------------------------- LLM calls
  async function loadLlmCalls() {
    clearTimeout(llmTimer);
    try {
      const answer = await api(`runs/${runId}/llm-calls`);
      const body = h("tbody");
      if (!answer.calls.length) body.append(emptyRow(7, "No LLM calls recorded for this run."));
      for (const c of answer.calls) {
        body.append(
          h(
            "tr",
            h("td.nowrap", { title: c.occurred_at }, fmtClock(c.occurred_at)),
            h("td", c.model, h("span.muted", ` ${c.provider}`)),
            h("td.num", num(c.input_tokens)),
            h("td.num", num(c.output_tokens)),
            h("td.num", money(c.cost_usd)),
            h("td.num", c.latency_ms === null ? "—" : `${Math.round(c.latency_ms)} ms`),
            h("td", c.outcome === "ok" ? c.outcome : h("span.badge.s-failed", c.outcome)),
          ),
        );
      }
      clear(llmSlot).append(
        h("p.muted", `${num(answer.total)} call${answer.total === 1 ? "" : "s"}, ${money(answer.cost_usd)} in total${answer.total > answer.calls.length ? ` (the first ${answer.calls.length} shown)` : ""}.`),
        h(
          "div.table-wrap",
          h(
            "table",
            h("thead", h("tr", ["Time", "Model", "Input tokens", "Output tokens", "Cost", "Latency", "Outcome"].map((t) => h("th", { scope: "col" }, t)))),
            body,
          ),
        ),
      );
    } catch (err) {
      clear(llmSlot).append(err.status === 503 ? h("div.notice.warn", "The optimizer is not answering, so LLM calls cannot be shown right now. ", err.message) : errorBox(err, "LLM calls"));
    }
    if (run && !TERMINAL.has(run.state)) llmTimer = setTimeout(loadLlmCalls, 15000);
  }

  // ---------------------------------------------------------------- live
  function onMessage(msg) {
    if (msg.type === "log.chunk") {
      const chunk = msg.event || {};
      appendLines((chunk.lines || []).map((l, i) => ({ ...l, attempt: chunk.attempt, line: chunk.first_line + i })));
      return;
    }
    if (msg.type === "gap") {
      loadEvents();
      loadLogs();
      return;
    }
    if (msg.event && addEvent({ seq: Number(String(msg.cursor).split(":")[0]), subject: msg.subject, type: msg.type, event: msg.event })) renderEvents();
    if (!refreshTimer) {
      refreshTimer = setTimeout(async () => {
        refreshTimer = null;
        const before = run && run.state;
        await loadRun();
        if (run && before !== run.state) {
          renderTimeline();
          if (TERMINAL.has(run.state)) loadLlmCalls();
        }
      }, 250);
    }
  }

  const stream = new LiveStream({ run_id: runId, logs: runId }, onMessage, (s, d) => indicator.set(s, d));
  const ticker = setInterval(() => {
    if (run && !TERMINAL.has(run.state)) renderTimeline();
  }, 5000);
  loadRun().then(() => {
    if (run) {
      loadEvents();
      loadLogs();
      loadLlmCalls();
    }
  });
  return () => {
    stream.close();
    clearInterval(ticker);
    clearTimeout(refreshTimer);
    clearTimeout(llmTimer);
    clearTimeout(searchTimer);
  };
}
