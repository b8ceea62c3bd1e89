"""`fabrik import` and `fabrik export`: runs as portable NDJSON, and Smithers databases.

`fabrik import smithers DB... --project P` reads Smithers SQLite databases; `fabrik import FILE...`
reads portable NDJSON (`-` for stdin); both send the documents to `POST /api/v1/imports/runs` in
batches that fit the gateway's body limit. `fabrik export --project P` writes a project's finished
runs as NDJSON. See docs/migration.md.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import msgspec

from fabrik_cli.client import ApiClient
from fabrik_cli.commands.common import api_option, err, open_client
from fabrik_cli.errors import CliError, UsageError
from fabrik_cli.migrate.smithers import SmithersError, read_database
from fabrik_common.events import TERMINAL_STATES
from fabrik_common.ids import is_dns1123_label
from fabrik_common.portable import (
    LineError,
    PortableEvent,
    PortableOrigin,
    PortableRun,
    decode_line,
    encode_line,
    iter_ndjson,
)

IMPORT_PATH = "/imports/runs"
DEFAULT_BATCH_BYTES = 512 * 1024
EVENTS_PAGE = 1000


def batches(lines: Iterable[bytes], limit: int) -> Iterator[list[bytes]]:
    """Consecutive lines grouped so that each group's size stays within `limit` bytes."""
    batch: list[bytes] = []
    size = 0
    for line in lines:
        if batch and size + len(line) > limit:
            yield batch
            batch, size = [], 0
        batch.append(line)
        size += len(line)
    if batch:
        yield batch


def send(client: ApiClient, runs: Sequence[PortableRun], batch_bytes: int) -> tuple[int, int, list[str]]:
    """POST the runs in batches; (published, duplicates, errors for runs too large to send)."""
    published = duplicates = 0
    errors: list[str] = []
    lines: list[bytes] = []
    for run in runs:
        line = encode_line(run)
        if len(line) > batch_bytes:
            errors.append(
                f"run {run.run_id} ({run.origin.system} {run.origin.source_run_id}): its document is "
                f"{len(line)} bytes, more than --batch-bytes {batch_bytes}"
            )
            continue
        lines.append(line)
    for batch in batches(lines, batch_bytes):
        # The API client sends JSON; NDJSON goes through its connection pool as raw content.
        response = client._http.post(
            IMPORT_PATH,
            content=b"".join(batch),
            headers={"Content-Type": "application/x-ndjson"},
            timeout=120.0,
        )
        if response.status_code >= 400:
            raise client._error(response)
        answer = response.json()
        published += int(answer["published"])
        duplicates += int(answer["duplicates"])
    return published, duplicates, errors


def read_ndjson(sources: Sequence[str]) -> list[PortableRun]:
    runs: list[PortableRun] = []
    problems: list[str] = []
    for source in sources:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise UsageError(f"cannot read {source}: {exc.strerror}") from exc
        for number, content in iter_ndjson(data.splitlines()):
            try:
                runs.append(decode_line(content, number))
            except LineError as exc:
                problems.append(f"{source}: {exc}")
    if problems:
        raise UsageError(f"{len(problems)} invalid line(s); nothing was imported", problems[:50])
    return runs


@click.command("import")
@click.argument("sources", nargs=-1, required=True, metavar="[smithers] SOURCE...")
@click.option(
    "--project", default=None, help="Project of the imported Smithers runs (required for smithers)."
)
@click.option("--env", "env", default="dev", show_default=True, help="Environment of imported Smithers runs.")
@click.option(
    "--write",
    "write_to",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Write the documents as NDJSON to this file ('-' for stdout) instead of importing them.",
)
@click.option(
    "--batch-bytes",
    type=click.IntRange(min=1024),
    default=DEFAULT_BATCH_BYTES,
    show_default=True,
    help="Largest request body; keep it under the gateway's FABRIK_MAX_BODY_BYTES.",
)
@api_option
def import_command(
    sources: tuple[str, ...],
    project: str | None,
    env: str,
    write_to: str | None,
    batch_bytes: int,
    api: str | None,
) -> None:
    """Import finished runs: `fabrik import smithers DB... --project P` or `fabrik import FILE...`.

    Importing the same runs again creates nothing new. Smithers runs that cannot be read are
    reported one by one; the others are imported and the command exits 1 at the end."""
    errors: list[str] = []
    if sources[0] == "smithers":
        databases = sources[1:]
        if not databases:
            raise UsageError("name at least one Smithers database: fabrik import smithers DB... --project P")
        if project is None:
            raise UsageError("--project is required to import Smithers runs")
        for name, value in (("--project", project), ("--env", env)):
            if not is_dns1123_label(value):
                raise UsageError(
                    f"{name} {value!r} must be a DNS-1123 label: lowercase letters, digits and '-', "
                    "start and end alphanumeric, at most 63 characters"
                )
        runs: list[PortableRun] = []
        for database in databases:
            try:
                result = read_database(Path(database), project=project, env=env)
            except SmithersError as exc:
                errors.append(str(exc))
                continue
            runs.extend(result.runs)
            errors.extend(result.errors)
            for warning in result.warnings:
                err(f"Warning: {warning}")
    else:
        runs = read_ndjson(sources)
    if write_to is not None:
        data = b"".join(encode_line(run) for run in runs)
        if write_to == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            Path(write_to).write_bytes(data)
        summary = f"{len(runs)} run(s) written"
    else:
        with open_client(api) as client:
            published, duplicates, too_large = send(client, runs, batch_bytes)
        errors.extend(too_large)
        summary = (
            f"{len(runs) - len(too_large)} run(s) imported "
            f"({published} sent for the first time, {duplicates} sent before)"
        )
    for line in errors:
        err(f"Error: {line}")
    err(summary + (f"; {len(errors)} not imported" if errors else ""))
    if errors:
        raise CliError(f"{len(errors)} run(s) or database(s) were not imported (listed above)")


def _parse_time(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise UsageError(
            f"{flag} {value!r}: use an ISO 8601 date or time, e.g. 2026-01-31 or 2026-01-31T12:00Z"
        ) from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


_decode_run = msgspec.json.Decoder(PortableRun)


def _events(client: ApiClient, run_id: str) -> list[Mapping[str, Any]]:
    items: list[Mapping[str, Any]] = []
    after: str | None = None
    while True:
        page = client.run_events(run_id, after=after, limit=EVENTS_PAGE)
        items.extend(page["items"])
        after = page.get("next_cursor")
        if not after:
            return items


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def document_of(view: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> PortableRun:
    """The portable document of a finished run: the imported one as it was imported, else built
    from the run and its lifecycle events."""
    for item in events:
        if item.get("type") == "run.imported":
            return _decode_run.decode(msgspec.json.encode(item["event"]["run"]))
    requested = _time(view["created_at"])
    assert requested is not None
    return PortableRun(
        run_id=view["run_id"],
        project=view["project"],
        env=view["env"],
        spec=view.get("spec_id"),
        labels=dict(view.get("labels") or {}),
        requested_at=requested,
        started_at=_time(view.get("started_at")),
        finished_at=_time(view.get("finished_at")),
        state=view["state"],
        reason=view.get("reason"),
        message=view.get("message") or "",
        events=[
            PortableEvent(
                seq=int(item["seq"]),
                time=_time(item["event"].get("occurred_at")),
                type=str(item["type"]),
                payload=item["event"],
            )
            for item in events
        ],
        origin=PortableOrigin(system="fabrik", source_run_id=view["run_id"]),
    )


@click.command("export")
@click.option("--project", required=True, help="The project whose runs to export.")
@click.option("--from", "from_", default=None, metavar="TIME", help="Runs created at or after (ISO 8601).")
@click.option("--to", "to", default=None, metavar="TIME", help="Runs created before (ISO 8601).")
@click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    show_default=True,
    help="Where to write the NDJSON ('-' is stdout).",
)
@api_option
def export_command(project: str, from_: str | None, to: str | None, file: str, api: str | None) -> None:
    """Write a project's finished runs as portable NDJSON, oldest first (runs still in progress
    are skipped and counted on stderr)."""
    if not is_dns1123_label(project):
        raise UsageError(f"--project {project!r} must be a DNS-1123 label")
    since, until = _parse_time(from_, "--from"), _parse_time(to, "--to")
    documents: list[bytes] = []
    skipped = 0
    with open_client(api) as client:
        views: list[Mapping[str, Any]] = []
        for page in client.iter_run_pages(project=project, limit=200):
            views.extend(page["items"])
        views.sort(key=lambda v: str(v["run_id"]))
        for view in views:
            created = _time(view["created_at"])
            assert created is not None
            if (since and created < since) or (until and created >= until):
                continue
            if view["state"] not in TERMINAL_STATES:
                skipped += 1
                continue
            documents.append(encode_line(document_of(view, _events(client, view["run_id"]))))
    data = b"".join(documents)
    if file == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        Path(file).write_bytes(data)
    err(f"{len(documents)} run(s) exported" + (f"; {skipped} still in progress skipped" if skipped else ""))
