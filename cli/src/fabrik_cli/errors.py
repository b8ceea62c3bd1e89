"""Errors the `fabrik` command reports to a person: a message, detail lines and an exit code.

Exit codes: 2 for a usage or validation error (the request, a flag or a file is wrong; fix it and
retry), 1 for everything else (not found, conflict, server error, unreachable API, a waited run
that did not succeed). Click's own usage errors exit 2 as well.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure with a readable message; `details` are printed one per line under it."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, details: Sequence[str] = (), *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)
        if exit_code is not None:
            self.exit_code = exit_code

    def render(self) -> str:
        lines = [f"Error: {self.message}", *(f"  {line}" for line in self.details)]
        return "\n".join(lines)


class UsageError(CliError):
    """Bad input found before anything was sent (a file, a flag value, a local validation)."""

    exit_code = EXIT_USAGE


def field_lines(errors: Sequence[tuple[str, str]]) -> list[str]:
    """`field: rule`, one per invalid field."""
    return [f"{field}: {rule}" for field, rule in errors]
