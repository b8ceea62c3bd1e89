"""`/api/v1/schedules` and `fabrik schedule` over a real NATS server, with the real gateway and the
real scheduler in this process (the scheduler's schedule clock driven by the test)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml
from click.testing import CliRunner
from nats.js.errors import KeyNotFoundError
from prometheus_client import CollectorRegistry

from fabrik_cli.main import cli
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.clock import ManualClock
from fabrik_common.events import AuditRecorded, RunRequested
from fabrik_common.ids import utcnow
from fabrik_common.metrics import BusMetrics
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import OPS, RUNS
from fabrik_gateway.app import build as build_gateway
from fabrik_gateway.auth.jwt import mint_hs256
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.settings import GatewaySettings
from fabrik_scheduler.app import build as build_scheduler
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.state import SchedulerState

SECRET = "an-hs256-secret-of-at-least-32-bytes!"
LIST_FIELDS = {
    "id",
    "name",
    "project",
    "cron",
    "timezone",
    "paused",
    "next_fire_at",
    "last_fired_at",
    "health",
    "consecutive_failures",
}
VALID: dict[str, Any] = {
    "name": "nightly",
    "project": "demo",
    "cron": "@hourly",
    "timezone": "Europe/Berlin",
    "concurrency": "forbid",
    "catch_up": "latest",
    "run": {"workload": {"command": ["echo", "hello"]}, "labels": {"team": "core"}},
    "expectations": {"min_runtime_seconds": 60, "alert_channels": ["ops"]},
}


def bearer(roles: object, subject: str = "user") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(SECRET, subject, roles)}"}


ADMIN = bearer("admin", "admin")
DEV = bearer({"demo": "developer"}, "dev")
VIEWER = bearer("viewer", "viewer")
OTHER = bearer({"other": "developer"}, "other-dev")


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met in time"
        await asyncio.sleep(0.02)


@dataclass
class Stack:
    http: httpx.AsyncClient
    gateway: Service[Gateway]
    scheduler: Service[SchedulerState]
    clock: ManualClock
    bus: Bus
    events: list[Any]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http.port}"

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
async def stack(nats_url: str) -> AsyncIterator[Stack]:
    clock = ManualClock(utcnow())
    gateway = build_gateway(
        GatewaySettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            anonymous_role="none",
            jwt_hs256_secret=SECRET,
            rate_limit_per_minute=100000,
            rate_limit_burst=100000,
        )
    )
    scheduler = build_scheduler(
        SchedulerSettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            schedule_interval_seconds=0.05,
            dispatch_interval_seconds=0.05,
            lease_ttl_seconds=2.0,
        ),
        clock=clock,
    )
    async with running_service(gateway), running_service(scheduler):
        bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
        await bus.connect()
        events: list[Any] = []

        async def collect(msg: Any) -> None:
            codec = RUNS.codec if msg.subject.startswith("fabrik.runs.") else OPS.codec
            assert codec is not None
            events.append(codec.decode(msg.data))

        await bus.js.subscribe("fabrik.runs.>", ordered_consumer=True, cb=collect)
        await bus.js.subscribe("fabrik.audit.>", ordered_consumer=True, cb=collect)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http.port}", timeout=20) as http:
            await until(lambda: scheduler.is_leader, what="scheduler leads")
            try:
                yield Stack(http, gateway, scheduler, clock, bus, events)
            finally:
                await bus.close()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


async def test_invalid_schedules_are_refused_naming_every_field(stack: Stack) -> None:
    body = {
        "name": "",
        "project": "Bad_Project",
        "cron": "61 * * *",
        "timezone": "Mars/Olympus",
        "concurrency": "sometimes",
        "catch_up": "never",
        "catch_up_limit": 0,
        "run": {
            "project": "demo",
            "workload": {"env": {"FABRIK_TOKEN": "x"}},
            "resources": {"cpu": "1", "memory": "1Gi"},
            "template": "default",
        },
        "expectations": {"failure_tolerance": 0, "realert_interval_seconds": 5, "bogus": 1},
        "colour": "blue",
    }
    found = problem(await stack.http.post("/api/v1/schedules", json=body, headers=ADMIN), 422)
    fields = {e["field"] for e in found["errors"]}
    assert fields >= {
        "name",
        "project",
        "cron",
        "timezone",
        "concurrency",
        "catch_up",
        "catch_up_limit",
        "run.project",
        "run.spec",
        "run.workload.env.FABRIK_TOKEN",
        "run.template",
        "expectations.failure_tolerance",
        "expectations.realert_interval_seconds",
        "expectations.bogus",
        "colour",
    }, fields
    rules = {e["field"]: e["rule"] for e in found["errors"]}
    assert "cron expression of 5 fields" in rules["cron"]
    assert "IANA time zone" in rules["timezone"]
    assert "top level" in rules["run.project"]
    # A single bad alias, each field of a 5-field expression named by its rule.
    for cron, fragment in (("@fortnightly", "unknown alias"), ("0 0 * 13 *", "bad month field")):
        bad = problem(
            await stack.http.post("/api/v1/schedules", json={**VALID, "cron": cron}, headers=ADMIN), 422
        )
        assert [e["field"] for e in bad["errors"]] == ["cron"]
        assert fragment in bad["errors"][0]["rule"]
    problem(await stack.http.post("/api/v1/schedules", content=b"{not json", headers=ADMIN), 400)
    # Nothing was stored.
    listed = await stack.http.get("/api/v1/schedules", headers=ADMIN)
    assert listed.json() == {"items": []}


async def test_roles_decide_who_creates_changes_and_sees(stack: Stack) -> None:
    problem(await stack.http.get("/api/v1/schedules"), 401)
    assert (
        "role"
        in problem(await stack.http.post("/api/v1/schedules", json=VALID, headers=VIEWER), 403)["detail"]
    )
    created = await stack.http.post("/api/v1/schedules", json=VALID, headers=DEV)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    assert created.headers["location"] == f"/api/v1/schedules/{sid}"
    assert created.json()["created_by"] == "dev"
    # A developer of another project neither sees it nor changes it; a viewer reads but does not change.
    problem(await stack.http.post("/api/v1/schedules", json={**VALID, "project": "demo"}, headers=OTHER), 403)
    problem(await stack.http.get(f"/api/v1/schedules/{sid}", headers=OTHER), 404)
    problem(await stack.http.post(f"/api/v1/schedules/{sid}/pause", headers=OTHER), 404)
    assert (await stack.http.get("/api/v1/schedules", headers=OTHER)).json() == {"items": []}
    assert (await stack.http.get(f"/api/v1/schedules/{sid}", headers=VIEWER)).status_code == 200
    problem(await stack.http.post(f"/api/v1/schedules/{sid}/pause", headers=VIEWER), 403)
    problem(await stack.http.delete(f"/api/v1/schedules/{sid}", headers=VIEWER), 403)
    assert (await stack.http.post(f"/api/v1/schedules/{sid}/pause", headers=DEV)).json()["paused"] is True


async def test_api_round_trip_fires_and_records_history(stack: Stack) -> None:
    created = await stack.http.post("/api/v1/schedules", json=VALID, headers=DEV)
    assert created.status_code == 201, created.text
    schedule = created.json()
    sid = schedule["id"]
    assert schedule["run"] == {
        "env": "dev",
        "workload": {"command": ["echo", "hello"], "args": [], "env": {}},
        "timeout_seconds": 86400,
        "priority": "normal",
        "labels": {"team": "core"},
    }

    listed = (await stack.http.get("/api/v1/schedules?project=demo", headers=VIEWER)).json()["items"]
    assert [item["id"] for item in listed] == [sid]
    assert set(listed[0]) >= LIST_FIELDS
    item = listed[0]
    assert (item["cron"], item["timezone"], item["paused"], item["health"]) == (
        "@hourly",
        "Europe/Berlin",
        False,
        "ok",
    )
    next_fire = datetime.fromisoformat(item["next_fire_at"])
    assert timedelta(0) < next_fire - utcnow() <= timedelta(hours=1)
    assert next_fire.minute == 0 and next_fire.second == 0
    problem(await stack.http.get("/api/v1/schedules?project=Not_A_Label", headers=VIEWER), 400)

    # PATCH with a stale revision is refused; with the current one it applies.
    revision = schedule["revision"]
    stale = {"cron": "*/30 * * * *", "expected_revision": revision + 5}
    assert (
        problem(await stack.http.patch(f"/api/v1/schedules/{sid}", json=stale, headers=DEV), 412)["errors"][
            0
        ]["field"]
        == "expected_revision"
    )
    bad = problem(
        await stack.http.patch(f"/api/v1/schedules/{sid}", json={"timezone": "Nowhere/X"}, headers=DEV), 422
    )
    assert [e["field"] for e in bad["errors"]] == ["timezone"]
    patched = await stack.http.patch(
        f"/api/v1/schedules/{sid}", json={"cron": "*/30 * * * *", "expected_revision": revision}, headers=DEV
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["cron"] == "*/30 * * * *"
    assert patched.json()["revision"] > revision

    paused = (await stack.http.post(f"/api/v1/schedules/{sid}/pause", headers=DEV)).json()
    assert paused["paused"] is True
    assert paused["next_fire_at"] is None
    resumed = (await stack.http.post(f"/api/v1/schedules/{sid}/resume", headers=DEV)).json()
    assert resumed["paused"] is False

    # The scheduler's clock reaches the next slot: it fires, the history shows the run.
    slot = datetime.fromisoformat(resumed["next_fire_at"])
    stack.clock.set(slot + timedelta(seconds=1))
    await until(lambda: bool(stack.of(RunRequested)), what="the slot fired")
    request = stack.of(RunRequested)[0]
    assert request.params.schedule_id == sid
    assert request.params.schedule_slot == slot
    assert request.params.labels == {"team": "core"}

    async def history() -> list[dict[str, Any]]:
        answer = await stack.http.get(f"/api/v1/schedules/{sid}/history", headers=VIEWER)
        assert answer.status_code == 200, answer.text
        items: list[dict[str, Any]] = answer.json()["items"]
        return items

    deadline = time.monotonic() + 10
    while not (items := await history()) or items[0]["outcome"] not in ("queued", "starting"):
        assert time.monotonic() < deadline, items
        await asyncio.sleep(0.05)
    assert items[0]["status"] == "fired"
    assert items[0]["run_id"] == request.run_id
    assert datetime.fromisoformat(items[0]["slot"]) == slot
    shown = (await stack.http.get(f"/api/v1/schedules/{sid}", headers=VIEWER)).json()
    assert datetime.fromisoformat(shown["last_fired_at"]) == slot
    assert shown["active_runs"] == [request.run_id]
    assert shown["observed"] is True
    # The run shows the schedule and slot it is for.
    run = (await stack.http.get(f"/api/v1/runs/{request.run_id}", headers=VIEWER)).json()
    assert (run["project"], run["schedule_id"]) == ("demo", sid)
    assert datetime.fromisoformat(run["schedule_slot"]) == slot

    deleted = await stack.http.delete(f"/api/v1/schedules/{sid}", headers=DEV)
    assert deleted.json() == {"id": sid, "deleted": True}
    problem(await stack.http.get(f"/api/v1/schedules/{sid}", headers=VIEWER), 404)
    problem(await stack.http.get(f"/api/v1/schedules/{sid}/history", headers=VIEWER), 404)
    problem(await stack.http.get("/api/v1/schedules/not-an-id", headers=VIEWER), 404)

    # Every change was audited, by whom and on which schedule.
    await until(lambda: len(stack.of(AuditRecorded)) >= 6, what="audit records")
    audited = [(a.action, a.actor, a.target, a.result) for a in stack.of(AuditRecorded)]
    for action in (
        "schedule.create",
        "schedule.update",
        "schedule.pause",
        "schedule.resume",
        "schedule.delete",
    ):
        assert (action, "dev", f"schedule:{sid}", "ok") in audited, (action, audited)
    # The refused PATCH (412) is on record too, not as a success.
    assert any(a[0] == "schedule.update" and a[3] != "ok" for a in audited), audited


async def test_openapi_documents_the_schedule_routes(stack: Stack) -> None:
    document = (await stack.http.get("/api/v1/openapi.json")).json()
    paths = document["paths"]
    assert set(paths["/api/v1/schedules"]) >= {"get", "post"}
    assert set(paths["/api/v1/schedules/{schedule_id}"]) >= {"get", "patch", "delete"}
    assert "post" in paths["/api/v1/schedules/{schedule_id}/pause"]
    assert "post" in paths["/api/v1/schedules/{schedule_id}/resume"]
    assert "get" in paths["/api/v1/schedules/{schedule_id}/history"]
    schemas = document["components"]["schemas"]
    assert schemas["CreateScheduleRequest"]["additionalProperties"] is False
    assert set(schemas["ScheduleView"]["required"]) >= LIST_FIELDS


async def _cli(stack: Stack, home: Path, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """`fabrik ...` as an operator runs it, in a worker thread (its HTTP calls are blocking, the
    gateway answers from this event loop)."""
    env = {
        "FABRIK_API_URL": stack.url,
        "FABRIK_HOME": str(home),
        "FABRIK_TOKEN": token or mint_hs256(SECRET, "cli-user", {"demo": "developer"}),
    }
    result = await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


async def test_cli_round_trip(stack: Stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    document = tmp_path / "nightly.yaml"
    document.write_text(
        yaml.safe_dump(
            {
                "name": "nightly",
                "project": "demo",
                "cron": "30 2 * * *",
                "timezone": "Europe/Berlin",
                "run": {"labels": {"team": "core"}},
            }
        )
    )
    code, out, err = await _cli(
        stack,
        home,
        "schedule",
        "create",
        "-f",
        str(document),
        "--concurrency",
        "forbid",
        "--min-runtime",
        "60",
        "--alert-channel",
        "ops",
        "--json",
        "--",
        "python",
        "nightly.py",
    )
    assert code == 0, err
    created = json.loads(out)
    sid = created["id"]
    assert created["run"]["workload"]["command"] == ["python", "nightly.py"]
    assert created["run"]["labels"] == {"team": "core"}
    assert created["concurrency"] == "forbid"
    assert created["expectations"]["alert_channels"] == ["ops"]

    code, out, err = await _cli(stack, home, "schedule", "list")
    assert code == 0, err
    header = out.splitlines()[0]
    for column in ("ID", "NAME", "PROJECT", "CRON", "HEALTH", "NEXT", "LAST FIRED"):
        assert column in header
    assert sid in out and "30 2 * * * Europe/Berlin" in out

    code, out, err = await _cli(stack, home, "schedule", "list", "--json")
    assert [i["id"] for i in json.loads(out)["items"]] == [sid]

    code, out, err = await _cli(stack, home, "schedule", "show", sid)
    assert code == 0, err
    assert "Europe/Berlin" in out and "forbid" in out and "min runtime 60s" in out

    code, out, err = await _cli(stack, home, "schedule", "pause", sid)
    assert (code, out.strip()) == (0, f"schedule {sid} paused"), err
    code, out, err = await _cli(stack, home, "schedule", "resume", sid)
    assert code == 0 and out.startswith(f"schedule {sid} resumed"), err

    code, out, err = await _cli(stack, home, "schedule", "history", sid)
    assert (code, out.strip()) == (0, "no slots yet"), err

    # An invalid cron is refused by the API, the error naming the flag.
    code, out, err = await _cli(
        stack, home, "schedule", "create", "-n", "x", "-p", "demo", "--cron", "every day", "--", "true"
    )
    assert code != 0
    assert "--cron" in err and "cron expression" in err

    # A viewer may not delete.
    code, out, err = await _cli(
        stack, home, "schedule", "delete", sid, "--yes", token=mint_hs256(SECRET, "v", "viewer")
    )
    assert code != 0 and "role" in err
    code, out, err = await _cli(stack, home, "schedule", "delete", sid, "--yes")
    assert (code, out.strip()) == (0, f"schedule {sid} deleted"), err
    code, out, err = await _cli(stack, home, "schedule", "show", sid)
    assert code != 0 and "does not exist" in err


async def test_deleted_schedule_state_is_removed_by_the_scheduler(stack: Stack) -> None:
    created = (await stack.http.post("/api/v1/schedules", json=VALID, headers=DEV)).json()
    sid = created["id"]
    kv = await stack.bus.js.key_value("schedules")

    async def has_state() -> bool:
        try:
            entry = await kv.get(f"state.{sid}")
        except KeyNotFoundError:
            return False
        return bool(entry.value)

    deadline = time.monotonic() + 10
    while not await has_state():
        assert time.monotonic() < deadline, "state written"
        await asyncio.sleep(0.05)
    assert (await stack.http.delete(f"/api/v1/schedules/{sid}", headers=DEV)).status_code == 200
    deadline = time.monotonic() + 10
    while await has_state():
        assert time.monotonic() < deadline, "state removed"
        await asyncio.sleep(0.05)
    registry = stack.scheduler.registry
    assert (
        registry.get_sample_value(
            "fabrik_schedule_consecutive_failures", {"schedule": sid, "project": "demo"}
        )
        is None
    )


def test_the_run_template_has_the_fields_of_a_run_submission() -> None:
    from fabrik_gateway.models import SubmitRunRequest
    from fabrik_gateway.schedules import RunTemplateIn

    submission = {f.name: f.type for f in msgspec.structs.fields(SubmitRunRequest) if f.name != "project"}
    template = {f.name: f.type for f in msgspec.structs.fields(RunTemplateIn)}
    assert template == submission
