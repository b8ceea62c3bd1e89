// The dashboard shell: who is signed in, navigation, client-side routes.
import { api, ApiError, hasRole, onUnauthorized, setToken, token } from "./api.js";
import { clear, errorBox, h } from "./ui.js";
import { runsPage } from "./pages/runs.js";
import { runPage } from "./pages/run.js";
import { queuePage } from "./pages/queue.js";
import { submitPage } from "./pages/submit.js";
import { schedulesPage } from "./pages/schedules.js";
import { costsPage } from "./pages/costs.js";
import { experimentsPage } from "./pages/experiments.js";
import { signInPage } from "./pages/signin.js";

const ROUTES = [
  [/^\/(runs\/?)?$/, "runs", runsPage],
  [/^\/runs\/([0-9A-Za-z]{26})\/?$/, "runs", runPage],
  [/^\/queue\/?$/, "queue", queuePage],
  [/^\/submit\/?$/, "submit", submitPage],
  [/^\/schedules\/?$/, "schedules", schedulesPage],
  [/^\/costs\/?$/, "costs", costsPage],
  [/^\/experiments\/?$/, "experiments", experimentsPage],
  [/^\/experiments\/([0-9A-Za-z]{26})\/?$/, "experiments", experimentsPage],
];

const app = {
  me: null,
  cleanup: null,
  navigate(path, replace = false) {
    if (replace) history.replaceState(null, "", path);
    else history.pushState(null, "", path);
    render();
  },
  can(role, project) {
    return hasRole(this.me, role, project);
  },
};

function main() {
  return document.getElementById("main");
}

function leave() {
  if (app.cleanup) {
    const fn = app.cleanup;
    app.cleanup = null;
    fn();
  }
}

function showSignIn(reason) {
  leave();
  app.me = null;
  document.getElementById("nav").hidden = true;
  clear(document.getElementById("who"));
  const root = clear(main());
  app.cleanup = signInPage(root, app, reason, async (credential) => {
    setToken(credential);
    await start();
  });
}

function renderWho() {
  const who = clear(document.getElementById("who"));
  const me = app.me;
  const role = me.role || Object.entries(me.project_roles || {}).map(([p, r]) => `${p}:${r}`).join(", ") || "no role";
  who.append(h("span.subject", { title: `${me.kind}${me.token_id ? ` ${me.token_id}` : ""}` }, me.name || me.subject), " ", h("span.role", role));
  if (token()) {
    who.append(
      " ",
      h("button.btn.small", { type: "button", on: { click: () => { setToken(""); showSignIn("Signed out."); } } }, "Sign out"),
    );
  } else if (!me.authenticated) {
    who.append(" ", h("button.btn.small", { type: "button", on: { click: () => showSignIn("") } }, "Sign in"));
  }
}

function render() {
  if (!app.me) return;
  leave();
  const path = location.pathname;
  const nav = document.getElementById("nav");
  let found = null;
  for (const [pattern, name, page] of ROUTES) {
    const m = pattern.exec(path);
    if (m) {
      found = [name, page, m.slice(1)];
      break;
    }
  }
  for (const a of nav.querySelectorAll("a")) {
    const current = found && a.dataset.page === found[0];
    if (current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
    a.hidden = Boolean(a.dataset.needs) && !app.can(a.dataset.needs);
  }
  const root = clear(main());
  if (!found) {
    root.append(h("h1", "Not found"), h("p", "No page at ", h("code", path), ". ", h("a", { href: "/", dataset: { link: "" } }, "Back to runs")));
    return;
  }
  const [name, page, params] = found;
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · Fabrik`;
  try {
    app.cleanup = page(root, app, ...params) || null;
  } catch (err) {
    root.append(errorBox(err, name));
    throw err;
  }
}

async function start() {
  try {
    app.me = await api("whoami", { quiet401: true });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      const hadToken = Boolean(token());
      if (hadToken) setToken("");
      showSignIn(hadToken ? `Your credential was refused: ${err.message}` : "");
      return;
    }
    const root = clear(main());
    root.append(errorBox(err, "who you are"));
    if (token()) {
      root.append(
        h("button.btn.primary", { type: "button", on: { click: () => { setToken(""); showSignIn(""); } } }, "Sign in with another credential"),
      );
    }
    return;
  }
  document.getElementById("nav").hidden = false;
  renderWho();
  render();
}

onUnauthorized((problem) => {
  setToken("");
  showSignIn(`Signed out: ${problem.detail || "your credential is no longer accepted"}.`);
});

document.addEventListener("click", (e) => {
  const a = e.target.closest && e.target.closest("a[data-link]");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin) return;
  e.preventDefault();
  if (url.pathname + url.search !== location.pathname + location.search) app.navigate(url.pathname + url.search);
  main().focus({ preventScroll: true });
});
window.addEventListener("popstate", render);

start();
