// Submit: a form for POST /api/v1/runs; the API's field errors are shown next to their fields.
import { api } from "../api.js";
import { clear, errorBox, h } from "../ui.js";

const DNS1123 = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const DNS1123_RULE = "lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters";
const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** Split a command line into words: whitespace separates, '…' and "…" quote, \ escapes. */
export function splitWords(text) {
  const words = [];
  let word = null;
  let quote = null;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (quote) {
      if (c === quote) quote = null;
      else if (c === "\\" && quote === '"' && i + 1 < text.length) word += text[++i];
      else word += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      word = word ?? "";
    } else if (c === "\\" && i + 1 < text.length) {
      word = (word ?? "") + text[++i];
    } else if (/\s/.test(c)) {
      if (word !== null) words.push(word);
      word = null;
    } else word = (word ?? "") + c;
  }
  if (quote) throw new Error(`unclosed ${quote} quote`);
  if (word !== null) words.push(word);
  return words;
}

function pairs(text, what) {
  const out = {};
  const bad = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    const i = line.indexOf("=");
    if (i <= 0) bad.push(`"${line}" is not ${what}=value`);
    else out[line.slice(0, i).trim()] = line.slice(i + 1);
  }
  return [out, bad];
}

export function submitPage(root, app) {
  if (!app.can("developer")) {
    root.append(h("h1", "Submit a run"), h("div.notice.error", { role: "alert" }, "Submitting runs needs the developer role (in at least one project). Your role: ", app.me.role || "none", "."));
    return null;
  }
  const fields = {};
  const errors = {};
  function field(name, label, control, help) {
    const id = `s-${name}`;
    control.id = id;
    control.name = name;
    const err = h("p.field-error", { id: `${id}-error`, "aria-live": "polite" });
    const helpEl = help ? h("p.help", { id: `${id}-help` }, help) : null;
    control.setAttribute("aria-describedby", `${id}-error${help ? ` ${id}-help` : ""}`);
    fields[name] = control;
    errors[name] = err;
    return h("div.field", { dataset: { field: name } }, h("label", { for: id }, label), control, helpEl, err);
  }
  function setError(name, text) {
    const control = fields[name];
    const err = errors[name];
    if (!control || !err) return false;
    err.textContent = text || "";
    if (text) control.setAttribute("aria-invalid", "true");
    else control.removeAttribute("aria-invalid");
    return true;
  }

  const projects = h("datalist#s-projects");
  const project = h("input", { required: true, autocomplete: "off", list: "s-projects", spellcheck: "false", maxLength: 63 });
  const env = h("input", { value: "dev", autocomplete: "off", spellcheck: "false", maxLength: 63 });
  const specMode = h("select", h("option", { value: "upload" }, "upload a spec file (JSON)"), h("option", { value: "path" }, "path in the repository"), h("option", { value: "none" }, "no spec (a plain workload)"));
  const specFile = h("input", { type: "file", accept: ".json,application/json" });
  const specPath = h("input", { placeholder: "specs/feature.json", autocomplete: "off" });
  const repoUrl = h("input", { placeholder: "https://github.com/org/repo or a local path", autocomplete: "off" });
  const repoRef = h("input", { placeholder: "HEAD", autocomplete: "off" });
  const command = h("input", { placeholder: "python -m agent --fast", autocomplete: "off", spellcheck: "false" });
  const envVars = h("textarea", { rows: 3, placeholder: "LOG_LEVEL=debug", spellcheck: "false" });
  const sizing = h("select", h("option", { value: "default" }, "template: default (500m/1Gi, up to 2/4Gi)"), h("option", { value: "high-cpu" }, "template: high-cpu (8/16Gi)"), h("option", { value: "custom" }, "custom resources"));
  const cpu = h("input", { placeholder: "2", autocomplete: "off" });
  const memory = h("input", { placeholder: "4Gi", autocomplete: "off" });
  const priority = h("select", h("option", { value: "normal" }, "normal"), h("option", { value: "high" }, "high"), h("option", { value: "low" }, "low"));
  const budget = h("input", { type: "number", min: "0", step: "0.01", placeholder: "no limit", inputMode: "decimal" });
  const timeout = h("input", { type: "number", min: "1", max: "86400", placeholder: "86400 (24 h)", inputMode: "numeric" });
  const labels = h("textarea", { rows: 2, placeholder: "team=core", spellcheck: "false" });
  const formError = h("div#s-form-error", { role: "alert" });
  const submitBtn = h("button.btn.primary", { type: "submit" }, "Start run");

  const specFileField = field("spec", "Spec file", specFile, "A spec document (JSON); it is validated by the API.");
  const specPathField = field("spec_path", "Spec path", specPath, "Relative to the repository root.");
  const cpuField = field("resources.cpu", "CPU", cpu, "e.g. 500m or 2");
  const memField = field("resources.memory", "Memory", memory, "e.g. 512Mi or 4Gi");
  function syncModes() {
    specFileField.hidden = specMode.value !== "upload";
    specPathField.hidden = specMode.value !== "path";
    cpuField.hidden = memField.hidden = sizing.value !== "custom";
  }
  specMode.addEventListener("change", syncModes);
  sizing.addEventListener("change", syncModes);

  function checkLabel(input, name, required) {
    const v = input.value.trim();
    if (!v) return setError(name, required ? "required" : "") && !required;
    if (v.length > 63 || !DNS1123.test(v)) {
      setError(name, `must be a DNS-1123 label: ${DNS1123_RULE}`);
      return false;
    }
    setError(name, "");
    return true;
  }
  project.addEventListener("input", () => checkLabel(project, "project", false));
  env.addEventListener("input", () => checkLabel(env, "env", false));

  const form = h(
    "form.card.submit",
    { novalidate: true, on: { submit: (e) => { e.preventDefault(); send(); } } },
    h("fieldset", h("legend", "Where"), h("div.grid", field("project", "Project", project, "A DNS-1123 label, e.g. payments"), field("env", "Environment", env, "Its variables come from the project's environment of that name."))),
    h("fieldset", h("legend", "What"), h("div.grid", field("spec_mode", "Spec", specMode), specFileField, specPathField), h("div.grid", field("repo.url", "Repository", repoUrl), field("repo.ref", "Ref", repoRef)), field("workload.command", "Command", command, "Words are split on spaces; quote with ' or \"."), field("workload.env", "Variables", envVars, "KEY=value, one per line; FABRIK_ and SMITHERS_ keys are reserved.")),
    h("fieldset", h("legend", "How"), h("div.grid", field("template", "Resources", sizing), cpuField, memField), h("div.grid", field("priority", "Priority", priority), field("budget_usd", "Budget (USD)", budget), field("timeout_seconds", "Timeout (seconds)", timeout)), field("labels", "Labels", labels, "key=value, one per line")),
    formError,
    h("div.actions", submitBtn),
  );
  form.append(projects);
  root.append(h("h1", "Submit a run"), form);
  syncModes();
  api("projects").then(
    (answer) => answer.items.forEach((p) => projects.append(h("option", { value: p.project }))),
    (err) => clear(formError).append(errorBox(err, "projects")),
  );

  function fieldFor(path) {
    if (fields[path]) return path;
    if (path.startsWith("spec.") || path === "spec") return specMode.value === "path" ? "spec_path" : "spec";
    if (path.startsWith("workload.env")) return "workload.env";
    if (path.startsWith("workload.")) return "workload.command";
    if (path.startsWith("labels")) return "labels";
    if (path.startsWith("repo")) return "repo.url";
    if (path.startsWith("resources")) return sizing.value === "custom" ? "resources.cpu" : "template";
    return null;
  }

  async function build() {
    const body = { project: project.value.trim(), env: env.value.trim() || "dev", priority: priority.value };
    const local = [];
    if (specMode.value === "upload") {
      const file = specFile.files && specFile.files[0];
      if (!file) local.push(["spec", "choose a spec file, or pick another option"]);
      else {
        try {
          body.spec = JSON.parse(await file.text());
        } catch (e) {
          local.push(["spec", `not valid JSON: ${e.message}`]);
        }
      }
    } else if (specMode.value === "path") {
      if (!specPath.value.trim()) local.push(["spec_path", "required (or pick another option)"]);
      else body.spec_path = specPath.value.trim();
    }
    if (repoUrl.value.trim()) body.repo = { url: repoUrl.value.trim(), ref: repoRef.value.trim() || "HEAD" };
    let words = [];
    try {
      words = splitWords(command.value);
    } catch (e) {
      local.push(["workload.command", e.message]);
    }
    const [vars, badVars] = pairs(envVars.value, "KEY");
    badVars.forEach((b) => local.push(["workload.env", b]));
    for (const k of Object.keys(vars)) if (!ENV_KEY.test(k)) local.push(["workload.env", `${k} is not a variable name`]);
    if (words.length || Object.keys(vars).length) body.workload = { command: words, env: vars };
    if (sizing.value === "custom") body.resources = { cpu: cpu.value.trim(), memory: memory.value.trim() };
    else body.template = sizing.value;
    if (budget.value !== "") body.budget_usd = Number(budget.value);
    if (timeout.value !== "") body.timeout_seconds = Number(timeout.value);
    const [labelMap, badLabels] = pairs(labels.value, "key");
    badLabels.forEach((b) => local.push(["labels", b]));
    if (Object.keys(labelMap).length) body.labels = labelMap;
    return [body, local];
  }

  async function send() {
    for (const name of Object.keys(fields)) setError(name, "");
    clear(formError);
    const [body, local] = await build();
    const projectOk = checkLabel(project, "project", true);
    const envOk = checkLabel(env, "env", false);
    for (const [name, rule] of local) setError(name, rule);
    if (!projectOk || !envOk || local.length) {
      focusFirstError();
      return;
    }
    submitBtn.disabled = true;
    try {
      const run = await api("runs", { method: "POST", body });
      app.navigate(`/runs/${run.run_id}`);
    } catch (err) {
      submitBtn.disabled = false;
      const unplaced = [];
      for (const e of err.fieldErrors) {
        const name = fieldFor(e.field);
        const shown = name && errors[name].textContent;
        const text = e.field === name ? e.rule : `${e.field}: ${e.rule}`;
        if (!name || !setError(name, shown ? `${shown}; ${text}` : text)) unplaced.push(e);
      }
      clear(formError).append(
        err.status === 422 || err.status === 400
          ? h("div.notice.error", h("strong", "The run was not started. "), err.message)
          : errorBox(err, "the run"),
      );
      if (unplaced.length) formError.append(h("ul.field-list", unplaced.map((e) => h("li", h("code", e.field), ` ${e.rule}`))));
      focusFirstError();
    }
  }

  function focusFirstError() {
    const bad = form.querySelector("[aria-invalid=true]");
    if (bad) bad.focus();
  }
  project.focus();
  return null;
}
