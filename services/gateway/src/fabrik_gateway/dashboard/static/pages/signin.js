import { h } from "../ui.js";

export function signInPage(root, app, reason, submit) {
  document.title = "Sign in · Fabrik";
  const input = h("textarea#credential", {
    name: "credential",
    rows: 3,
    required: true,
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "fbk_… or eyJ…",
    "aria-describedby": "credential-help",
  });
  const error = h("p.field-error#credential-error", { role: "alert" });
  const form = h(
    "form.card.signin",
    {
      on: {
        submit: async (e) => {
          e.preventDefault();
          const value = input.value.trim();
          if (!value) {
            error.textContent = "Paste an API token or a JWT.";
            input.focus();
            return;
          }
          await submit(value);
        },
      },
    },
    h("h1", "Sign in to Fabrik"),
    reason ? h("p.notice.warn", reason) : null,
    h("label", { for: "credential" }, "API token or JWT"),
    input,
    h(
      "p.help#credential-help",
      "It stays in this browser tab only (session storage) and is sent as a bearer token to this gateway's API. ",
      "Create one with ",
      h("code", "fabrik token create"),
      " or ask an admin.",
    ),
    error,
    h("button.btn.primary", { type: "submit" }, "Sign in"),
  );
  root.append(form);
  input.focus();
  return null;
}
