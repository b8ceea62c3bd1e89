#!/usr/bin/env python3
"""Run Fabrik from a fresh checkout with nothing but Python 3.11+.

    python3 dev.py up       start NATS and all six services (the `fabrik up` command)
    python3 dev.py test     run the test suite
    python3 dev.py lint     ruff and mypy --strict
    python3 dev.py fabrik … any fabrik command

It finds `uv` (on PATH or importable), or installs it into .fabrik/bootstrap, then runs the
command in the project's locked environment (`uv run --locked`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BOOTSTRAP = ROOT / ".fabrik" / "bootstrap"

if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs before the project environment exists
    sys.exit(f"Fabrik needs Python 3.11 or newer; this is {sys.version.split()[0]}")


def find_uv() -> list[str]:
    on_path = shutil.which("uv")
    if on_path:
        return [on_path]
    try:
        import uv  # type: ignore[import-not-found, unused-ignore]

        return [uv.find_uv_bin()]
    except (ImportError, FileNotFoundError):
        pass
    bin_dir = BOOTSTRAP / ("Scripts" if os.name == "nt" else "bin")
    uv_bin = bin_dir / ("uv.exe" if os.name == "nt" else "uv")
    if not uv_bin.exists():
        print("dev.py: installing uv into .fabrik/bootstrap (once)", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=True).create(BOOTSTRAP)
        python = bin_dir / ("python.exe" if os.name == "nt" else "python")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "uv"], check=True)
    return [str(uv_bin)]


def test_workers(args: list[str]) -> list[str]:
    """Parallel test workers (pytest-xdist) unless the caller chose: most tests wait on the
    processes and servers they start, so three workers keep two cores busy. FABRIK_TEST_WORKERS
    sets the number; 0 runs the tests in this one process."""
    if any(a.startswith(("-n", "--numprocesses")) or a.endswith("no:xdist") for a in args):
        return []
    workers = os.environ.get("FABRIK_TEST_WORKERS", "3")
    return [] if workers == "0" else ["-n", workers]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    uv = find_uv()
    run = [*uv, "run", "--locked", "--project", str(ROOT)]
    commands = {
        "up": [*run, "fabrik", "up", *rest],
        "test": [*run, "pytest", *test_workers(rest), *rest],
        "lint": None,
        "fabrik": [*run, "fabrik", *rest],
    }
    if command not in commands:
        print(f"dev.py: unknown command {command!r}; try: up, test, lint, fabrik", file=sys.stderr)
        return 2
    if command == "lint":
        steps = [
            [*run, "ruff", "check", "."],
            [*run, "ruff", "format", "--check", "."],
            [
                *run,
                "mypy",
                "--strict",
                "libs/common/src",
                "libs/runtime/src",
                *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "services").glob("*/src")),
            ],
        ]
        for step in steps:
            code = subprocess.call(step, cwd=ROOT)
            if code:
                return code
        return 0
    try:
        return subprocess.call(commands[command], cwd=ROOT)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
