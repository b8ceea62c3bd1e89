// Schedules: GET /api/v1/schedules when this gateway has it; says so plainly when it does not.
import { api, hasRoute } from "../api.js";
import { age, clear, errorBox, fmtTime, h } from "../ui.js";

function health(item) {
  const value = item.health || "unknown";
  const cls = { ok: "level-ok", healthy: "level-ok", failing: "level-limit", missed: "level-warning", late: "level-warning" }[value] || "level-none";
  return h(`span.badge.${cls}`, value, item.consecutive_failures ? ` · ${item.consecutive_failures} failed in a row` : "");
}

export function schedulesPage(root) {
  const slot = h("div", h("p.muted", "Loading…"));
  root.append(h("h1", "Schedules"), slot);
  let stopped = false;

  async function load() {
    try {
      if (!(await hasRoute("/api/v1/schedules"))) {
        if (!stopped) notAvailable("its API description has no GET /api/v1/schedules");
        return;
      }
      const answer = await api("schedules");
      if (stopped) return;
      const body = h("tbody");
      if (!answer.items.length) body.append(h("tr.empty", h("td", { colSpan: 8 }, "No schedules yet. Create one with ", h("code", "fabrik schedule create"), ".")));
      for (const s of answer.items) {
        body.append(
          h(
            "tr",
            h("td", h("strong", s.name || s.id), s.name && s.id !== s.name ? h("div.muted.mono", s.id) : null),
            h("td", s.project),
            h("td", h("code", s.cron)),
            h("td", s.timezone || "UTC"),
            h("td", s.paused ? h("span.badge.level-none", "paused") : h("span.badge.level-ok", "active")),
            h("td", s.paused || !s.next_fire_at ? h("span.muted", "—") : h("span", { title: s.next_fire_at }, fmtTime(s.next_fire_at))),
            h("td", s.last_fired_at ? h("span", { title: fmtTime(s.last_fired_at) }, `${age(s.last_fired_at)} ago`) : h("span.muted", "never")),
            h("td", health(s)),
          ),
        );
      }
      clear(slot).append(
        h(
          "div.table-wrap",
          h("table", h("thead", h("tr", ["Schedule", "Project", "Cron", "Time zone", "State", "Next run", "Last run", "Health"].map((t) => h("th", { scope: "col" }, t)))), body),
        ),
      );
    } catch (err) {
      if (stopped) return;
      if (err.status === 404) notAvailable("GET /api/v1/schedules answered 404");
      else clear(slot).append(errorBox(err, "schedules"));
    }
  }
  function notAvailable(why) {
    clearInterval(poll);
    clear(slot).append(h("div.notice.info", h("strong", "Schedules are not available on this gateway. "), `It has no schedules API (${why}). A gateway with schedules shows each one here with its cron, time zone, next and last run, and health.`));
  }
  load();
  const poll = setInterval(load, 30000);
  return () => {
    stopped = true;
    clearInterval(poll);
  };
}
