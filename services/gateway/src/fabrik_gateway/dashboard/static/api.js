// Every piece of data comes from /api/v1 with the operator's credential (or none).
const TOKEN_KEY = "fabrik.token";
const ROLES = ["viewer", "developer", "maintainer", "admin"];

export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
  /** Field errors of a validation problem: [{field, rule}]. */
  get fieldErrors() {
    return Array.isArray(this.problem.errors) ? this.problem.errors : [];
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}
export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

const listeners = { unauthorized: [] };
export function onUnauthorized(fn) {
  listeners.unauthorized.push(fn);
}

function headers(extra) {
  const h = { Accept: "application/json", ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function problemOf(response) {
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      return await response.json();
    } catch (e) {
      return { detail: `unreadable answer (${e.message})` };
    }
  }
  return { detail: `${response.status} ${response.statusText}` };
}

/** fetch against the API; JSON in and out; ApiError on any status >= 400. */
export async function api(path, { method = "GET", body, query, signal, quiet401 = false } = {}) {
  let url = path.startsWith("/") ? path : `/api/v1/${path}`;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined || v === null || v === "") continue;
      if (Array.isArray(v)) v.forEach((x) => params.append(k, x));
      else params.append(k, String(v));
    }
    const qs = params.toString();
    if (qs) url += `?${qs}`;
  }
  const init = { method, headers: headers(body !== undefined ? { "Content-Type": "application/json" } : {}), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(url, init);
  if (response.status === 401 && !quiet401) {
    const problem = await problemOf(response);
    listeners.unauthorized.forEach((fn) => fn(problem));
    throw new ApiError(401, problem);
  }
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  if (response.status === 204) return null;
  return response.json();
}

export function roleRank(role) {
  return role ? ROLES.indexOf(role) : -1;
}

/** Whether the caller (an answer of /whoami) holds `minimum` in `project` (or anywhere). */
export function hasRole(me, minimum, project) {
  if (!me) return false;
  let best = roleRank(me.role);
  const perProject = me.project_roles || {};
  if (project) best = Math.max(best, roleRank(perProject[project]));
  else for (const r of Object.values(perProject)) best = Math.max(best, roleRank(r));
  return best >= roleRank(minimum);
}

/** URL of the live stream WebSocket. */
export function streamUrl(query) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) if (v) params.append(k, v);
  const t = token();
  if (t) params.append("access_token", t);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const qs = params.toString();
  return `${scheme}//${location.host}/api/v1/stream${qs ? `?${qs}` : ""}`;
}

let described = null;
/** Whether this gateway's OpenAPI document has `GET path` (asked once, without credentials). */
export async function hasRoute(path) {
  if (!described) {
    described = fetch("/api/v1/openapi.json", { headers: { Accept: "application/json" } }).then(async (r) => {
      if (!r.ok) throw new ApiError(r.status, { detail: `the API description answered ${r.status}` });
      return r.json();
    });
    described.catch(() => {
      described = null;
    });
  }
  const doc = await described;
  const item = (doc.paths || {})[path];
  return Boolean(item && item.get);
}
