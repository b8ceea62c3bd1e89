import { h } from "../ui.js";

export function experimentsPage(root) {
  root.append(
    h("h1", "Experiments"),
    h(
      "div.notice.info",
      h("strong", "Not available yet. "),
      "This gateway has no experiments API: the optimizer does not run experiments on run configuration yet. ",
      "When it does, this page will list each experiment with its status, arms, sample sizes, current estimate and decision.",
    ),
  );
  return null;
}
