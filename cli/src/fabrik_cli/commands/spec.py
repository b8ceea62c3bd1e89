"""`fabrik spec validate`: check a spec (or todo) file offline, with the gateway's own validators."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from fabrik_cli.commands.common import emit, output_option
from fabrik_cli.errors import EXIT_USAGE
from fabrik_cli.submit import DocumentKind, document_errors, read_document


@click.group()
def spec() -> None:
    """Spec and todo documents."""


@spec.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True))
@click.option("--todo", is_flag=True, help="FILE is a todo, not a spec.")
@output_option
def validate(file: Path, todo: bool, output: str) -> None:
    """Check FILE (JSON, or YAML by extension; `-` for stdin) against the spec or todo schema.

    Exit code 0 when valid; 2 when invalid, with every invalid field listed as `field: rule`.
    With -o json: `{"file", "kind", "valid", "errors": [{"field", "rule"}]}`.
    """
    kind: DocumentKind = "todo" if todo else "spec"
    document = read_document(file, kind)
    errors = document_errors(document, kind)
    report: dict[str, Any] = {
        "file": str(file),
        "kind": kind,
        "valid": not errors,
        "errors": [{"field": f, "rule": r} for f, r in errors],
    }

    def table(data: dict[str, Any]) -> str:
        if data["valid"]:
            return f"{file}: valid {kind}"
        lines = [f"{file}: invalid {kind} ({len(errors)} error(s))"]
        lines += [f"  {e['field']}: {e['rule']}" for e in data["errors"]]
        return "\n".join(lines)

    emit(report, output, table)
    if errors:
        sys.exit(EXIT_USAGE)
