// Experiments: the optimizer's experiments on run configuration (GET /api/v1/experiments), one
// experiment with its arms, latest decision and history (/experiments/<id>), and its actions.
// A gateway without the experiments API says so plainly instead.
import { api, hasRole, hasRoute, roleRank } from "../api.js";
import { age, append, clear, confirmDialog, emptyRow, errorBox, fmtDuration, fmtTime, h, link, num, shortId, toast } from "../ui.js";

const LIST_ROUTE = "/api/v1/experiments";
const HISTORY_ROUTE = "/api/v1/optimizer/history";
const CANDIDATES_ROUTE = "/api/v1/experiments/candidates";
const STATE_LEVEL = {
  active: "level-ok",
  shipped: "level-ok",
  pending_approval: "level-warning",
  paused: "level-warning",
  rolled_back: "level-limit",
  invalid: "level-limit",
};
const DECISION_LEVEL = { SHIP: "level-ok", CONTINUE: "level-none", STOP: "level-warning", ROLLBACK: "level-limit", INVALID: "level-limit" };

function stateBadge(state) {
  return h(`span.badge.${STATE_LEVEL[state] || "level-none"}`, { title: `state: ${state}` }, String(state).replace(/_/g, " "));
}

function decisionBadge(decision) {
  if (!decision) return h("span.muted", "none yet");
  return h(`span.badge.${DECISION_LEVEL[decision] || "level-none"}`, decision);
}

/** A number as the API gave it: integers as they are, others to 4 significant places; null as —. */
function fmtNumber(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "boolean") return value ? "true" : "false";
  if (typeof value !== "number") return typeof value === "object" ? JSON.stringify(value) : String(value);
  if (Number.isInteger(value)) return value.toLocaleString();
  if (value !== 0 && Math.abs(value) < 1e-4) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

function signed(value) {
  if (value === null || value === undefined) return "—";
  const text = fmtNumber(value);
  return value > 0 ? `+${text}` : text;
}

/** Dollars to four significant digits: costs per run differ in fractions of a cent. */
function usd(value) {
  return `$${Number(Number(value).toPrecision(4))}`;
}

function rate(value) {
  return value === null || value === undefined ? "—" : `${(100 * value).toFixed(1)}%`;
}

function targetText(target) {
  const t = target || {};
  const parts = [];
  if (t.project) parts.push(`project ${t.project}`);
  if (t.env) parts.push(`env ${t.env}`);
  if (t.spec) parts.push(`spec ${t.spec}`);
  for (const [k, v] of Object.entries(t.labels || {})) parts.push(`${k}=${v}`);
  return parts.length ? parts.join(", ") : "every run";
}

function overridesText(overrides) {
  const entries = Object.entries(overrides || {});
  if (!entries.length) return h("span.muted", "defaults");
  return entries.map(([k, v]) => h("span.tag", `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`));
}

/** The per-treatment numbers of the latest decision (`numbers.arms.<treatment>`), when there are any. */
function treatmentNumbers(experiment, name) {
  const arms = experiment.numbers && experiment.numbers.arms;
  return arms && typeof arms === "object" ? arms[name] || null : null;
}

/** treatment − control success rate and its confidence-sequence bounds, as the decision gives them. */
function estimateOf(experiment) {
  const lines = [];
  for (const arm of experiment.treatments || []) {
    const n = treatmentNumbers(experiment, arm.name);
    if (!n || !("primary.estimate" in n)) continue;
    lines.push(
      h(
        "div.estimate",
        { title: `${arm.name} − ${experiment.control.name} success rate, with the bounds of its confidence sequence` },
        h("span.mono", { title: `estimate ${n["primary.estimate"]}, lower ${n["primary.lower"]}, upper ${n["primary.upper"]}` }, signed(n["primary.estimate"])),
        h("span.muted.mono", ` [${signed(n["primary.lower"])}, ${signed(n["primary.upper"])}]`),
        (experiment.treatments || []).length > 1 ? h("span.muted", ` ${arm.name}`) : null,
      ),
    );
  }
  return lines.length ? lines : h("span.muted", "—");
}

function sampleSize(experiment, name) {
  const sizes = experiment.numbers && experiment.numbers.sample_sizes;
  return sizes && typeof sizes === "object" && name in sizes ? sizes[name] : null;
}

function endsAt(experiment) {
  if (experiment.ended_at) return { label: "ended", at: experiment.ended_at };
  if (!experiment.started_at) return null;
  const at = new Date(new Date(experiment.started_at).getTime() + 1000 * experiment.max_duration_seconds).toISOString();
  return { label: "ends", at };
}

function pauseBanner(pause) {
  if (!pause || !pause.paused) return null;
  return h(
    "div.notice.warn.pause-banner",
    { role: "status" },
    h("strong", "Optimizer paused"),
    pause.reason ? `: ${pause.reason}` : "",
    pause.by || pause.at ? h("span.muted", ` (${[pause.by, pause.at ? fmtTime(pause.at) : null].filter(Boolean).join(", ")})`) : null,
    ". No run is assigned to any experiment until it is resumed.",
  );
}

/** Whether the caller holds `minimum` in `project`, or, for no project, in every project (as the API checks). */
function holds(me, minimum, project) {
  if (project) return hasRole(me, minimum, project);
  return Boolean(me) && roleRank(me.role) >= roleRank(minimum);
}

function notAvailable(slot, why) {
  clear(slot).append(
    h(
      "div.notice.info",
      h("strong", "Experiments are not available on this gateway. "),
      `It has no experiments API (${why}). A gateway with the optimizer's experiments shows each one here with its state, arms, sample sizes, current estimate and decision.`,
    ),
  );
}

export function experimentsPage(root, app, experimentId) {
  return experimentId ? detailPage(root, app, experimentId) : listPage(root, app);
}

// ------------------------------------------------------------------------------------ the list

function listPage(root, app) {
  const slot = h("div", h("p.muted", "Loading…"));
  root.append(h("h1", "Experiments"), slot);
  let stopped = false;
  let poll = null;

  function row(e) {
    const arms = [e.control, ...(e.treatments || [])].map((arm) => {
      const n = sampleSize(e, arm.name);
      return h("div.arm", h("span.mono", arm.name), n === null ? null : h("span.muted", ` ${num(n)} ${n === 1 ? "run" : "runs"}`));
    });
    const end = endsAt(e);
    const tr = h(
      "tr",
      { dataset: { experimentId: e.id } },
      h("td", link(`/experiments/${e.id}`, { title: e.id }, h("strong", e.name)), h("div.muted.mono", shortId(e.id))),
      h("td", targetText(e.target)),
      h("td.mono", e.parameter),
      h("td", stateBadge(e.state)),
      h("td", arms),
      h("td", estimateOf(e)),
      h("td.decision", decisionBadge(e.decision), (e.reasons || []).length ? h("ul.reasons", e.reasons.map((r) => h("li", r))) : null),
      h(
        "td.nowrap",
        e.started_at ? h("div", { title: fmtTime(e.started_at) }, `started ${age(e.started_at)} ago`) : h("div.muted", "not started"),
        end ? h("div.muted", { title: end.at }, `${end.label} ${fmtTime(end.at)}`) : null,
      ),
    );
    tr.addEventListener("click", (ev) => {
      if (ev.target.closest("a, button")) return;
      app.navigate(`/experiments/${e.id}`);
    });
    return tr;
  }

  async function startCandidate(c) {
    const ok = await confirmDialog("Start candidate", `${c.name}: ${c.summary}`, "Start");
    if (!ok) return;
    try {
      const answer = await api(`experiments/candidates/${c.id}/start`, { method: "POST" });
      toast(answer.experiment.state === "active" ? "Experiment started." : "Experiment created; it waits for an approval.");
      app.navigate(`/experiments/${answer.experiment.id}`);
    } catch (err) {
      toast(`Start failed: ${err.message}`, "error");
      load();
    }
  }

  /** The optimizer's proposals, with a Start button for whoever may create them (nothing when the API has none). */
  async function candidatesSection() {
    if (!(await hasRoute(CANDIDATES_ROUTE))) return null;
    let answer;
    try {
      answer = await api("experiments/candidates");
    } catch {
      return null;
    }
    const candidates = answer.candidates || [];
    if (!candidates.length) return null;
    const rows = candidates.map((c) => {
      const project = (c.target || {}).project;
      const may = project ? holds(app.me, "maintainer", project) : holds(app.me, "admin");
      const start = h("button", { type: "button", title: `Start ${c.id}` }, "Start");
      start.addEventListener("click", () => startCandidate(c));
      return h(
        "tr",
        { dataset: { candidateId: c.id } },
        h("td", h("strong", c.name), h("div.muted.mono", c.id)),
        h("td", targetText(c.target)),
        h("td.mono", c.parameter),
        h("td", c.risk),
        h("td", c.summary, h("div.muted", `${num(c.sample_size)} runs`)),
        h("td", may ? start : h("span.muted", "needs a maintainer")),
      );
    });
    return [
      h("h2", "Candidates"),
      h("p.help", answer.auto ? "Auto mode is on: low-risk candidates start by themselves." : "Proposed from the insights; a maintainer of the project starts one."),
      h(
        "div.table-wrap",
        h("table.candidates", h("thead", h("tr", ["Candidate", "Target", "Parameter", "Risk", "Why", ""].map((t) => h("th", { scope: "col" }, t)))), h("tbody", rows)),
      ),
    ];
  }

  async function load() {
    try {
      if (!(await hasRoute(LIST_ROUTE))) {
        if (!stopped) {
          clearInterval(poll);
          notAvailable(slot, `its API description has no GET ${LIST_ROUTE}`);
        }
        return;
      }
      const answer = await api("experiments");
      const proposed = await candidatesSection();
      if (stopped) return;
      // A refresh keeps the keyboard focus on the row it was on.
      const focused = document.activeElement && document.activeElement.closest ? document.activeElement.closest("tr[data-experiment-id]") : null;
      const focusedId = focused && slot.contains(focused) ? focused.dataset.experimentId : null;
      const body = h("tbody");
      const experiments = answer.experiments || [];
      if (!experiments.length) {
        body.append(
          emptyRow(8, [h("strong", "No experiments yet. "), "Create one with ", h("code", "fabrik optimizer experiments create --file experiment.json"), "."]),
        );
      }
      // Newest first: the API answers oldest first.
      for (const e of [...experiments].reverse()) body.append(row(e));
      append(clear(slot), [
        pauseBanner(answer.pause),
        h(
          "div.table-wrap",
          h(
            "table.experiments",
            h("thead", h("tr", ["Experiment", "Target", "Parameter", "State", "Arms (runs)", "Estimate", "Last decision", "Started / ends"].map((t) => h("th", { scope: "col" }, t)))),
            body,
          ),
        ),
        experiments.length ? h("p.help", "Runs: each arm's sample at the latest decision. Estimate: treatment − control success rate, with the bounds of its confidence sequence, from the latest decision.") : null,
        proposed,
      ]);
      if (focusedId) {
        const again = body.querySelector(`tr[data-experiment-id="${CSS.escape(focusedId)}"] a`);
        if (again) again.focus();
      }
    } catch (err) {
      if (stopped) return;
      if (err.status === 404) {
        clearInterval(poll);
        notAvailable(slot, `GET ${LIST_ROUTE} answered 404`);
      } else clear(slot).append(errorBox(err, "experiments"));
    }
  }
  load();
  poll = setInterval(load, 30000);
  return () => {
    stopped = true;
    clearInterval(poll);
  };
}

// ------------------------------------------------------------------------------------ one experiment

function kv(label, ...value) {
  return [h("dt", label), h("dd", ...value)];
}

/** A value exactly as the API gave it (numbers at full precision; null stays null). */
function raw(value) {
  if (value === null || value === undefined) return h("span.muted", "null");
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function numbersTable(entries) {
  return h(
    "div.table-wrap",
    h(
      "table.numbers",
      h("thead", h("tr", h("th", { scope: "col" }, "Number"), h("th.num", { scope: "col" }, "Value"))),
      h(
        "tbody",
        entries.map(([k, v]) => h("tr", h("td.mono", k), h("td.num.mono.wrap", raw(v)))),
      ),
    ),
  );
}

function decisionSection(e) {
  const numbers = e.numbers || {};
  const parts = [
    h(
      "p",
      decisionBadge(e.decision),
      e.evaluated_at ? h("span.muted", ` evaluated ${fmtTime(e.evaluated_at)}`) : null,
      e.winner ? h("span", " · winner ", h("strong.mono", e.winner)) : null,
    ),
  ];
  if ((e.reasons || []).length) parts.push(h("ul.reasons", e.reasons.map((r) => h("li", r))));
  const perTreatment = numbers.arms && typeof numbers.arms === "object" ? numbers.arms : {};
  for (const [name, values] of Object.entries(perTreatment)) {
    const decided = numbers.decisions && numbers.decisions[name];
    parts.push(
      h("h3", `${name} vs ${e.control.name}`, decided ? [" ", decisionBadge(decided)] : null),
      values && typeof values === "object" ? numbersTable(Object.entries(values)) : h("p.mono", raw(values)),
    );
  }
  const rest = Object.entries(numbers).filter(([k]) => k !== "arms" && k !== "decisions");
  if (rest.length) parts.push(h("h3", "Other numbers"), numbersTable(rest));
  if (!Object.keys(numbers).length && e.decision) parts.push(h("p.muted", "The decision carries no numbers."));
  if (!e.decision) parts.push(h("p.muted", "No decision yet: the optimizer decides once the arms have runs."));
  return parts;
}

function historyTable(entries) {
  if (!entries.length) return h("p.muted", "No history yet.");
  return h(
    "div.table-wrap",
    h(
      "table.history",
      h("thead", h("tr", ["Time", "Type", "Status / decision", "By", "Details"].map((t) => h("th", { scope: "col" }, t)))),
      h(
        "tbody",
        [...entries].reverse().map((entry) =>
          h(
            "tr",
            h("td.nowrap", { title: entry.at }, fmtTime(entry.at)),
            h("td", entry.type),
            h("td", entry.decision ? decisionBadge(entry.decision) : null, entry.status ? [" ", stateBadge(entry.status)] : null),
            h("td", entry.by || h("span.muted", "—")),
            h(
              "td.wrap",
              entry.message || null,
              entry.key ? h("div.mono", `${entry.key}: ${JSON.stringify(entry.old)} → ${JSON.stringify(entry.new)}`) : null,
              entry.numbers && Object.keys(entry.numbers).length
                ? h("details", h("summary", Object.keys(entry.numbers).length === 1 ? "1 number" : `${Object.keys(entry.numbers).length} numbers`), h("pre.numbers-json", JSON.stringify(entry.numbers, null, 2)))
                : null,
            ),
          ),
        ),
      ),
    ),
  );
}

function detailPage(root, app, experimentId) {
  document.title = `Experiment ${shortId(experimentId)} · Fabrik`;
  const actions = h("div.actions");
  const slot = h("div", h("p.muted", "Loading…"));
  const historySlot = h("div", h("p.muted", "Loading…"));
  const title = h("h1", "Experiment ", h("span.mono", { title: experimentId }, shortId(experimentId)));
  root.append(
    h("p", link("/experiments", "← All experiments")),
    h("div.title-row", title, actions),
    slot,
    h("section.card", { "aria-labelledby": "h-history" }, h("h2#h-history", "Optimizer history"), historySlot),
  );
  let stopped = false;
  let current = null;
  let poll = null;

  function renderActions(e) {
    clear(actions);
    const project = e.target && e.target.project;
    // As the API checks: approving needs a maintainer in the target project (everywhere, for an
    // experiment on every project); pausing, resuming and stopping a maintainer in the target
    // project (an admin, for an experiment on every project).
    const manage = project ? holds(app.me, "maintainer", project) : holds(app.me, "admin");
    if (e.state === "pending_approval" && holds(app.me, "maintainer", project)) {
      actions.append(h("button.btn.primary", { type: "button", on: { click: () => act("approve") } }, e.winner ? `Approve rollout of ${e.winner}` : "Approve start"));
    }
    if (!manage) return;
    if (e.state === "active") actions.append(h("button.btn", { type: "button", on: { click: () => act("pause") } }, "Pause"));
    if (e.state === "paused" || e.state === "draft") actions.append(h("button.btn.primary", { type: "button", on: { click: () => act("resume") } }, e.state === "draft" ? "Start" : "Resume"));
    if (["draft", "pending_approval", "active", "paused"].includes(e.state)) actions.append(h("button.btn.danger", { type: "button", on: { click: () => act("stop") } }, "Stop"));
  }

  const CONFIRM = {
    approve: ["Approve this experiment?", "", "Approve", false],
    pause: ["Pause this experiment?", "no more runs are assigned to it until it is resumed; its sample is kept.", "Pause", false],
    resume: ["Resume this experiment?", "runs matching its target are assigned to its arms again (within the guardrails).", "Resume", false],
    stop: ["Stop this experiment?", "it ends without a rollout; the defaults stay as they are. This cannot be undone.", "Stop experiment", true],
  };

  async function act(action) {
    const e = current.experiment;
    const [heading, fixed, label, danger] = CONFIRM[action];
    const text =
      action !== "approve"
        ? fixed
        : e.winner
          ? `its winning arm ${e.winner} is rolled out: the defaults of every matching run change. You are recorded as the approver.`
          : "it starts (medium or high risk: within the business-hours window). You are recorded as the approver.";
    const ok = await confirmDialog(heading, `${e.name} (${shortId(e.id)}): ${text}`, label, danger);
    if (!ok || stopped) return;
    try {
      const body = action === "approve" ? undefined : { reason: `${action} from the dashboard` };
      current = await api(`experiments/${e.id}/${action}`, { method: "POST", body });
      toast(`Experiment ${action === "stop" ? "stopped" : `${action}d`}.`);
      render();
      loadHistory();
    } catch (err) {
      toast(`${action[0].toUpperCase()}${action.slice(1)} failed: ${err.message}`, "error");
    }
  }

  function render() {
    const e = current.experiment;
    clear(title).append(e.name, " ", h("span.muted.mono", { title: e.id }, shortId(e.id)));
    document.title = `${e.name} · Experiments · Fabrik`;
    const end = endsAt(e);
    const statuses = new Map((current.arms || []).map((a) => [a.name, a]));
    const armRows = [e.control, ...(e.treatments || [])].map((arm, i) => {
      const s = statuses.get(arm.name) || {};
      return h(
        "tr",
        h("td", h("span.mono", arm.name), arm.name !== (i === 0 ? "control" : "treatment") ? h("div.muted", i === 0 ? "control" : "treatment") : null),
        h("td", overridesText(s.overrides || arm.overrides)),
        h("td.num", s.runs === undefined ? "—" : num(s.runs)),
        h("td.num", s.successes === undefined ? "—" : num(s.successes)),
        h("td.num", s.failures === undefined ? "—" : num(s.failures)),
        h("td.num", s.ooms === undefined ? "—" : num(s.ooms)),
        h("td.num", rate(s.success_rate)),
        h("td.num", s.cost_per_run_usd === null || s.cost_per_run_usd === undefined ? "—" : h("span", { title: String(s.cost_per_run_usd) }, usd(s.cost_per_run_usd))),
        h("td.num", s.duration_p95_seconds === null || s.duration_p95_seconds === undefined ? "—" : fmtDuration(s.duration_p95_seconds)),
      );
    });
    clear(slot).append(
      h(
        "section.card",
        { "aria-label": "Experiment" },
        h(
          "div.header-line",
          stateBadge(e.state),
          current.active_assignment ? h("span.badge.level-ok", "assigning runs") : h("span.badge.level-none", { title: "not active, or the optimizer is paused" }, "not assigning runs"),
        ),
        h(
          "dl.facts",
          kv("Id", h("span.mono", e.id)),
          kv("Target", targetText(e.target)),
          kv("Parameter", h("span.mono", e.parameter)),
          kv("Primary metric", e.primary_metric),
          kv("Treatment share", `${fmtNumber(e.treatment_share)} (split among ${(e.treatments || []).length})`),
          kv("Risk", e.risk, e.protected_env ? h("span.muted", " · may take protected environments") : null),
          kv("Min runs per arm", num(e.min_runs_per_arm)),
          kv("Max duration", fmtDuration(e.max_duration_seconds)),
          kv("Cost ceiling", `${fmtNumber(e.approved_cost_ceiling)} × control cost per run`),
          kv("Created", h("span", { title: e.created_at }, fmtTime(e.created_at)), h("span.muted", ` by ${e.created_by}`)),
          kv("Started", e.started_at ? h("span", { title: e.started_at }, fmtTime(e.started_at)) : h("span.muted", "not started")),
          kv(end && end.label === "ended" ? "Ended" : "Ends", end ? h("span", { title: end.at }, fmtTime(end.at)) : "—"),
        ),
      ),
      h(
        "section.card",
        { "aria-labelledby": "h-arms" },
        h("h2#h-arms", "Arms"),
        h(
          "div.table-wrap",
          h(
            "table.arms",
            h("thead", h("tr", ["Arm", "Overrides", "Runs", "Succeeded", "Failed", "OOM kills", "Success rate", "Cost / run", "Duration p95"].map((t, i) => h(i > 1 ? "th.num" : "th", { scope: "col" }, t)))),
            h("tbody", armRows),
          ),
        ),
      ),
      h("section.card", { "aria-labelledby": "h-decision" }, h("h2#h-decision", "Latest decision"), decisionSection(e)),
      h(
        "section.card",
        { "aria-labelledby": "h-guard" },
        h("h2#h-guard", "Guardrails and approvals"),
        h(
          "dl.facts",
          kv("Guardrails", (e.guardrails || []).length ? e.guardrails.map((g) => h("span.tag", g)) : h("span.muted", "none")),
          kv(
            "Approvals",
            (e.approvals || []).length
              ? h("ul.plain", e.approvals.map((a) => h("li", h("strong", a.kind), ` by ${a.by}, `, h("span", { title: a.at }, fmtTime(a.at)))))
              : h("span.muted", "none"),
          ),
        ),
      ),
    );
    renderActions(e);
  }

  async function loadHistory() {
    try {
      if (!(await hasRoute(HISTORY_ROUTE))) {
        if (!stopped) clear(historySlot).append(h("p.muted", `This gateway has no GET ${HISTORY_ROUTE}.`));
        return;
      }
      const answer = await api("optimizer/history", { query: { experiment_id: experimentId, limit: 200 } });
      if (!stopped) clear(historySlot).append(historyTable(answer.entries || []));
    } catch (err) {
      if (!stopped) clear(historySlot).append(errorBox(err, "the optimizer's history"));
    }
  }

  async function load() {
    try {
      if (!(await hasRoute(LIST_ROUTE))) {
        if (!stopped) {
          clearInterval(poll);
          notAvailable(slot, `its API description has no GET ${LIST_ROUTE}`);
          clear(historySlot).append(h("p.muted", "—"));
        }
        return;
      }
      const answer = await api(`experiments/${experimentId}`);
      if (stopped) return;
      current = answer;
      render();
    } catch (err) {
      if (stopped) return;
      clearInterval(poll);
      clear(actions);
      if (err.status === 404) clear(slot).append(h("div.notice.error", { role: "alert" }, h("strong", "No such experiment. "), `${experimentId} does not exist, or you do not see its project.`));
      else clear(slot).append(errorBox(err, "the experiment"));
    }
  }
  load();
  loadHistory();
  poll = setInterval(() => {
    if (!document.querySelector("dialog[open]")) {
      load();
      loadHistory();
    }
  }, 30000);
  return () => {
    stopped = true;
    clearInterval(poll);
  };
}
