#!/usr/bin/env python3
"""Fabrik's hello workload: a few steps with progress, a file in the workspace, a result.

Resumable: it records each finished step in `.hello-checkpoint.json` in the workspace, and an
attempt that finds a checkpoint continues after the last finished step.

Environment (besides what Fabrik sets: FABRIK_WORKSPACE, FABRIK_RUN_ID, FABRIK_ATTEMPT, ...):
  HELLO_STEPS              number of steps (default 6)
  HELLO_STEP_SECONDS       seconds per step (default 0.5)
  HELLO_FAIL_AFTER_STEP    make the first attempt fail after this step (to try `fabrik resume`)
  HELLO_MODEL              model of its one LLM call through the llm-proxy (default gpt-4o-mini;
                           answered by the offline `echo` provider when no provider is configured)
  HELLO_LLM                `off` skips the LLM call
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

try:
    from fabrik_runtime import report_progress, report_result
except ImportError:  # pragma: no cover - depends on the python that runs it
    sys.exit(
        "hello: fabrik_runtime is not importable; run the workload with the python of Fabrik's environment"
    )

PHASES = ("plan", "implement", "verify")
CHECKPOINT = ".hello-checkpoint.json"


def phase_of(step: int, steps: int) -> str:
    return PHASES[min((step - 1) * len(PHASES) // max(steps, 1), len(PHASES) - 1)]


def load_checkpoint(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["done"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0


def save_checkpoint(path: Path, done: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"done": done}))
    tmp.replace(path)


def ask_llm(question: str) -> str | None:
    """One chat completion through the llm-proxy, with the run's own key (OpenAI wire format)."""
    base = os.environ.get("OPENAI_BASE_URL")
    key = os.environ.get("OPENAI_API_KEY")
    if os.environ.get("HELLO_LLM") == "off" or not base or not key:
        print("hello: no LLM endpoint in the environment; skipping the LLM call")
        return None
    if not base.startswith(("http://", "https://")):
        print(f"hello: OPENAI_BASE_URL must be an http(s) URL, not {base!r}", file=sys.stderr)
        raise SystemExit(2)
    body = json.dumps(
        {
            "model": os.environ.get("HELLO_MODEL", "gpt-4o-mini"),
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 64,
        }
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        f"{base.rstrip('/')}/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - the llm-proxy URL Fabrik set
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"hello: the LLM call failed: {exc.code} {exc.read()[:300]!r}", file=sys.stderr)
        raise SystemExit(2) from exc
    except OSError as exc:
        print(f"hello: the LLM endpoint is unreachable: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    text = str(answer["choices"][0]["message"]["content"])
    usage = answer.get("usage") or {}
    print(f"hello: the model ({answer.get('model')}) said: {text[:200]}")
    print(f"hello: tokens in {usage.get('prompt_tokens')} / out {usage.get('completion_tokens')}")
    return text


def main() -> int:
    workspace = Path(os.environ.get("FABRIK_WORKSPACE", "."))
    run_id = os.environ.get("FABRIK_RUN_ID", "local")
    attempt = int(os.environ.get("FABRIK_ATTEMPT", "1"))
    steps = int(os.environ.get("HELLO_STEPS", "6"))
    step_seconds = float(os.environ.get("HELLO_STEP_SECONDS", "0.5"))
    fail_after = int(os.environ.get("HELLO_FAIL_AFTER_STEP", "0") or 0)

    checkpoint = workspace / CHECKPOINT
    resumed_from = min(load_checkpoint(checkpoint), steps)
    title = "hello"
    spec_file = os.environ.get("FABRIK_SPEC_FILE")
    if spec_file and Path(spec_file).is_file():
        title = json.loads(Path(spec_file).read_text()).get("title", title)
    print(f"hello: {title}")
    if resumed_from:
        print(f"hello: attempt {attempt} resumes after step {resumed_from} of {steps}")
    else:
        print(f"hello: attempt {attempt} starts {steps} steps of {step_seconds:g} s")

    for step in range(resumed_from + 1, steps + 1):
        phase = phase_of(step, steps)
        report_progress(phase=phase, task=f"step-{step}", finished=step - 1, total=steps)
        print(f"step {step}/{steps}: {phase}", flush=True)
        time.sleep(step_seconds)
        save_checkpoint(checkpoint, step)
        if fail_after and attempt == 1 and step == fail_after:
            print(f"hello: failing after step {step} as HELLO_FAIL_AFTER_STEP asks", file=sys.stderr)
            return 1

    answer = ask_llm(f"Say hello to {title}, in one short sentence.")
    report_progress(phase="verify", task="done", finished=steps, total=steps)
    (workspace / "hello.txt").write_text(
        f"Hello from Fabrik run {run_id}, attempt {attempt}: {steps} steps done"
        + (f" (resumed after step {resumed_from})" if resumed_from else "")
        + ".\n"
    )
    print("hello: wrote hello.txt")
    report_result(
        {
            "status": "ok",
            "steps": steps,
            "resumed_from": resumed_from,
            "attempt": attempt,
            "file": "hello.txt",
            "llm_answered": answer is not None,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
