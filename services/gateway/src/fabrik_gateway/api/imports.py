"""`/api/v1/imports/runs`: finished runs from portable NDJSON (docs/migration.md).

The gateway validates every line, then publishes one `run.imported` per run with a message id
derived from the run id (`import-<run_id>`), so the stream stores a re-sent run once within its
duplicate window; the scheduler, the single writer of run records, creates each record only if
absent, so importing twice creates nothing new whenever it happens.
"""

from __future__ import annotations

from typing import Any

import msgspec
import nats.errors
from litestar import Controller, Request, post
from litestar.di import NamedDependency

from fabrik_common.bus import MSG_ID, PublishError
from fabrik_common.events import RunImported
from fabrik_common.portable import LineError, PortableRun, decode_line, iter_ndjson
from fabrik_gateway.api.runs import problem_spec
from fabrik_gateway.audit import DETAILS_KEY
from fabrik_gateway.auth import Principal
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.auth.principal import require_role
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.problems import ProblemError, invalid

MAX_ERRORS = 50


class ImportResult(msgspec.Struct, kw_only=True):
    received: int
    """Runs in the body."""
    published: int
    """`run.imported` events stored on the RUNS stream by this request."""
    duplicates: int
    """Runs the stream already held from an import within its duplicate window."""
    run_ids: list[str]


def message_id(run_id: str) -> str:
    return f"import-{run_id}"


def parse_body(body: bytes) -> list[PortableRun]:
    """Every line as a document; a 422 naming each bad line and field (up to `MAX_ERRORS`)."""
    runs: list[PortableRun] = []
    errors: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for number, content in iter_ndjson(body.splitlines()):
        try:
            run = decode_line(content, number)
        except LineError as exc:
            errors.append((f"line {exc.line}: {exc.field}", exc.rule))
            if len(errors) >= MAX_ERRORS:
                break
            continue
        if run.run_id in seen:
            errors.append((f"line {number}: run_id", f"repeats line {seen[run.run_id]}"))
            continue
        seen[run.run_id] = number
        runs.append(run)
    if errors:
        raise invalid(errors, detail=f"{len(errors)} invalid line(s); nothing was imported")
    if not runs:
        raise ProblemError(400, "the body holds no run: send one portable run document per line")
    return runs


class ImportsController(Controller):
    path = "/api/v1/imports"
    tags = ["imports"]
    guards = [api_guard]

    @post(
        "/runs",
        status_code=202,
        summary="Import finished runs",
        opt={"audit_action": "runs.import"},
        description=(
            "One portable run document per line (`application/x-ndjson`, see docs/migration.md). "
            "Every line is validated first; when any is invalid nothing is imported and each bad "
            "line is named in `errors`. Each run is then recorded once, in its terminal state, "
            "whatever number of times it is imported. Needs the admin role."
        ),
        responses={
            400: problem_spec("An empty body"),
            401: problem_spec("Anonymous access is off"),
            403: problem_spec("The admin role is needed"),
            413: problem_spec("Body larger than the configured maximum: send fewer lines per request"),
            422: problem_spec("Invalid lines, each named in `errors` as `line N: field`"),
            503: problem_spec("Not connected to NATS yet"),
        },
    )
    async def import_runs(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
    ) -> ImportResult:
        require_role(principal, "admin", "import runs")
        runs = parse_body(await request.body())
        bus = gateway.bus
        published = duplicates = 0
        for run in runs:
            event = RunImported(
                run_id=run.run_id, project=run.project, run=run, imported_by=principal.subject
            )
            try:
                ack = await bus.publish(event, headers={MSG_ID: message_id(run.run_id)})
            except (PublishError, nats.errors.Error) as exc:
                raise ProblemError(
                    503,
                    f"run {run.run_id} could not be stored on the event bus after {published + duplicates} "
                    f"of {len(runs)}: {exc}; send the same lines again (imports are idempotent)",
                    headers={"Retry-After": "1"},
                ) from exc
            if ack.duplicate:
                duplicates += 1
            else:
                published += 1
        request.state[DETAILS_KEY] = {"runs": len(runs), "published": published}
        return ImportResult(
            received=len(runs),
            published=published,
            duplicates=duplicates,
            run_ids=[run.run_id for run in runs],
        )
