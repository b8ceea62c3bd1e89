"""The gateway's REST API over a real NATS server, with the real gateway service in this process.

The scheduler is not running: run records (and the queue snapshot) are written into their KV
buckets by the tests, as the scheduler would, to put runs into the states a test needs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from fabrik_common.codec import encode
from fabrik_common.events import (
    Event,
    LogLine,
    RunLogChunk,
    RunParameters,
    RunQueued,
    RunRequested,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.runs import TEMPLATES, QueueEntry, QueueSnapshot, RunRecord
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_gateway.app import build
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.settings import GatewaySettings

SPEC: dict[str, Any] = {
    "v": 1,
    "id": "hello",
    "title": "Hello",
    "status": "draft",
    "version": "1",
    "lastUpdated": "2025-01-01",
    "goals": ["greet"],
    "nonGoals": [],
    "req": {"api": [], "behavior": ["prints hello"], "obs": []},
    "accept": ["hello is printed"],
    "assume": [],
}
VALID: dict[str, Any] = {"project": "demo", "workload": {"command": ["echo", "hello"]}}


@dataclass
class Api:
    http: httpx.AsyncClient
    service: Service[Gateway]
    nc: NatsClient
    js: JetStreamContext
    runs_kv: KeyValue
    queue_kv: KeyValue

    @property
    def gateway(self) -> Gateway:
        return self.service.state

    async def runs_stream_count(self) -> int:
        return int((await self.js.stream_info("RUNS")).state.messages)

    async def put(self, record: RunRecord) -> None:
        await self.runs_kv.put(record.run_id, msgspec.json.encode(record))

    async def put_and_wait(self, record: RunRecord) -> None:
        await self.put(record)
        await wait_until(lambda: _same(self.gateway.readmodel.get(record.run_id), record))

    async def publish(self, event: Event) -> None:
        await self.js.publish(event.subject(), encode(event), headers={"Nats-Msg-Id": event.event_id})


def _same(current: RunRecord | None, record: RunRecord) -> bool:
    return current is not None and current.state == record.state and current.revision == record.revision


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def run_record(
    state: str = "running",
    *,
    project: str = "demo",
    labels: dict[str, str] | None = None,
    run_id: str | None = None,
    revision: int = 1,
) -> RunRecord:
    now = utcnow()
    return RunRecord(
        run_id=run_id or new_ulid(),
        project=project,
        env="dev",
        params=RunParameters(resources=TEMPLATES["default"], labels=labels or {}),
        state=state,  # type: ignore[arg-type]
        created_at=now,
        state_entered_at=now,
        revision=revision,
    )


def gateway_settings(nats_url: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "http_port": 0,
        "log_format": "text",
        "logs_follow_grace_seconds": 0.2,
        "logs_heartbeat_seconds": 0.5,
        # These tests are about the API itself; authentication has its own (test_gateway_auth.py).
        "anonymous_role": "admin",
        **overrides,
    }
    return GatewaySettings(**values)


@pytest.fixture
async def api(nats_url: str) -> AsyncIterator[Api]:
    async with started_api(nats_url) as value:
        yield value


class started_api:  # noqa: N801 - used like a function
    def __init__(self, nats_url: str, **overrides: Any) -> None:
        self.nats_url = nats_url
        self.overrides = overrides

    async def __aenter__(self) -> Api:
        service = build(gateway_settings(self.nats_url, **self.overrides))
        self._running = running_service(service)
        await self._running.__aenter__()
        self.nc = await nats.connect(self.nats_url)
        js = self.nc.jetstream()
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http.port}", timeout=20)
        await wait_until(lambda: _ready(self.http))
        return Api(
            http=self.http,
            service=service,
            nc=self.nc,
            js=js,
            runs_kv=await js.key_value("runs"),
            queue_kv=await js.key_value("queue"),
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.nc.close()
        await self._running.__aexit__(None, None, None)


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "status", "detail", "instance"} <= set(body)
    assert body["type"].startswith("https://fabrik.sh/problems/")
    return dict(body)


def fields_of(problem: dict[str, Any]) -> set[str]:
    return {e["field"] for e in problem.get("errors", [])}


# ------------------------------------------------------------------------------------------------
# submit


async def test_submit_publishes_one_request_and_the_run_is_visible_at_once(api: Api) -> None:
    body = {
        **VALID,
        "spec": SPEC,
        "repo": {"url": "https://github.com/example/hello", "ref": "main"},
        "labels": {"team": "core"},
        "priority": "high",
        "budget_usd": 2.5,
        "timeout_seconds": 600,
    }
    response = await api.http.post("/api/v1/runs", json=body)
    assert response.status_code == 201, response.text
    run = response.json()
    run_id = run["run_id"]
    assert response.headers["location"] == f"/api/v1/runs/{run_id}"
    assert run["state"] == "queued" and run["attempt"] == 1 and run["recorded"] is False
    assert run["spec_id"] == "hello" and run["labels"] == {"team": "core"} and run["priority"] == "high"
    assert run["resources"] == {
        "cpu_request": "500m",
        "memory_request": "1Gi",
        "cpu_limit": "2",
        "memory_limit": "4Gi",
    }
    assert datetime.fromisoformat(run["created_at"]) <= datetime.now(UTC)

    got = await api.http.get(f"/api/v1/runs/{run_id}")
    assert got.status_code == 200 and got.json()["run_id"] == run_id
    assert (await api.http.get(f"/api/v1/runs/{run_id.lower()}")).status_code == 200
    listed = (await api.http.get("/api/v1/runs")).json()
    assert [r["run_id"] for r in listed["items"]] == [run_id]

    assert await api.runs_stream_count() == 1
    msg = await api.js.get_last_msg("RUNS", f"fabrik.runs.requested.{run_id}")
    event = msgspec.json.decode(msg.data or b"", type=RunRequested)
    assert event.project == "demo" and event.env == "dev" and event.requested_by == "anonymous"
    assert event.params.spec == SPEC and event.params.template == "default"
    assert event.params.repo is not None and event.params.repo.ref == "main"
    assert event.params.timeout_seconds == 600 and event.params.budget_usd == 2.5

    # The scheduler's record replaces the pending view.
    record = run_record("starting", run_id=run_id, labels={"team": "core"})
    await api.put_and_wait(record)
    shown = (await api.http.get(f"/api/v1/runs/{run_id}")).json()
    assert shown["state"] == "starting" and shown["recorded"] is True


INVALID_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("missing project", {"workload": {"command": ["x"]}}, "project"),
    ("project not DNS-1123", {**VALID, "project": "My_Project"}, "project"),
    ("project too long", {**VALID, "project": "a" * 64}, "project"),
    ("env not DNS-1123", {**VALID, "env": "Prod!"}, "env"),
    ("nothing to run", {"project": "demo"}, "spec"),
    ("spec and spec_path", {**VALID, "spec": SPEC, "spec_path": "spec.json"}, "spec_path"),
    ("spec_path escapes", {**VALID, "spec_path": "../../etc/passwd"}, "spec_path"),
    ("spec missing title", {**VALID, "spec": {k: v for k, v in SPEC.items() if k != "title"}}, "spec.title"),
    ("spec goal not a string", {**VALID, "spec": {**SPEC, "goals": ["a", 2]}}, "spec.goals[1]"),
    ("spec unknown field", {**VALID, "spec": {**SPEC, "owner": "me"}}, "spec.owner"),
    ("spec req.api", {**VALID, "spec": {**SPEC, "req": {**SPEC["req"], "api": "x"}}}, "spec.req.api"),
    (
        "todo task",
        {**VALID, "todo": {"v": 1, "id": "t", "tdd": True, "dod": [], "tasks": [{"id": "a"}]}},
        "todo.tasks[0].do",
    ),
    ("repo without url", {**VALID, "repo": {"ref": "main"}}, "repo.url"),
    ("command not a list", {"project": "demo", "workload": {"command": "echo hi"}}, "workload.command"),
    (
        "reserved env FABRIK_",
        {"project": "demo", "workload": {"command": ["x"], "env": {"FABRIK_RUN_ID": "1"}}},
        "workload.env.FABRIK_RUN_ID",
    ),
    (
        "reserved env SMITHERS_",
        {"project": "demo", "workload": {"command": ["x"], "env": {"SMITHERS_KEY": "1"}}},
        "workload.env.SMITHERS_KEY",
    ),
    (
        "env value not a string",
        {"project": "demo", "workload": {"command": ["x"], "env": {"A": 1}}},
        "workload.env.A",
    ),
    ("cpu not a quantity", {**VALID, "resources": {"cpu": "two", "memory": "1Gi"}}, "resources.cpu"),
    ("memory not a quantity", {**VALID, "resources": {"cpu": "1", "memory": "1 GB"}}, "resources.memory"),
    ("zero cpu", {**VALID, "resources": {"cpu": "0m", "memory": "1Gi"}}, "resources.cpu"),
    ("memory missing", {**VALID, "resources": {"cpu": "1"}}, "resources.memory"),
    (
        "resources and template",
        {**VALID, "resources": {"cpu": "1", "memory": "1Gi"}, "template": "default"},
        "template",
    ),
    ("unknown template", {**VALID, "template": "huge"}, "template"),
    ("timeout zero", {**VALID, "timeout_seconds": 0}, "timeout_seconds"),
    ("timeout too long", {**VALID, "timeout_seconds": 86401}, "timeout_seconds"),
    ("timeout not an integer", {**VALID, "timeout_seconds": "1h"}, "timeout_seconds"),
    ("priority", {**VALID, "priority": "urgent"}, "priority"),
    ("negative budget", {**VALID, "budget_usd": -0.01}, "budget_usd"),
    ("label key", {**VALID, "labels": {"bad key": "x"}}, "labels.bad key"),
    ("label value", {**VALID, "labels": {"team": "not valid!"}}, "labels.team"),
    ("reserved label", {**VALID, "labels": {"fabrik.sh/project": "x"}}, "labels.fabrik.sh/project"),
    ("label value not a string", {**VALID, "labels": {"team": 1}}, "labels.team"),
    ("unknown field", {**VALID, "colour": "blue"}, "colour"),
    ("unknown nested field", {**VALID, "workload": {"command": ["x"], "cmd": ["y"]}}, "workload.cmd"),
]


async def test_every_invalid_field_is_named_and_nothing_is_published(api: Api) -> None:
    for name, body, field in INVALID_BODIES:
        response = await api.http.post("/api/v1/runs", json=body)
        problem = assert_problem(response, 422)
        assert field in fields_of(problem), (name, problem)
        assert all(e["rule"] for e in problem["errors"]), name
    # All at once: each one is named in a single answer.
    everything: dict[str, Any] = {
        "project": "Bad",
        "env": "-",
        "spec": {**SPEC, "goals": [1]},
        "workload": {"command": ["x"], "env": {"FABRIK_X": "1"}},
        "resources": {"cpu": "x", "memory": "y"},
        "timeout_seconds": 0,
        "priority": "p",
        "budget_usd": -1,
        "labels": {"a b": "c"},
        "extra": 1,
    }
    problem = assert_problem(await api.http.post("/api/v1/runs", json=everything), 422)
    assert fields_of(problem) >= {
        "project", "env", "spec.goals[0]", "workload.env.FABRIK_X", "resources.cpu", "resources.memory",
        "timeout_seconds", "priority", "budget_usd", "labels.a b", "extra",
    }  # fmt: skip
    assert problem["type"] == "https://fabrik.sh/problems/validation-failed"
    assert problem["instance"] == "/api/v1/runs"

    for raw in (b"{not json", b"", b"[1, 2"):
        problem = assert_problem(
            await api.http.post("/api/v1/runs", content=raw, headers={"content-type": "application/json"}),
            400,
        )
        assert fields_of(problem) == {"body"}
    problem = assert_problem(await api.http.post("/api/v1/runs", json=[VALID]), 422)
    assert fields_of(problem) == {"$"}
    problem = assert_problem(
        await api.http.post("/api/v1/runs", json=VALID, headers={"Idempotency-Key": "x" * 300}), 400
    )
    assert fields_of(problem) == {"Idempotency-Key"}
    too_big = {**VALID, "labels": {}, "spec_path": "x" * 900, "workload": {"command": ["y" * 2_000_000]}}
    assert_problem(await api.http.post("/api/v1/runs", json=too_big), 413)

    assert await api.runs_stream_count() == 0
    assert (await api.http.get("/api/v1/runs")).json()["items"] == []
    metrics = (await api.http.get("/metrics")).text
    assert 'fabrik_runs_submitted_total{outcome="rejected"}' in metrics


async def test_idempotency_key_returns_the_same_run_and_publishes_once(api: Api) -> None:
    headers = {"Idempotency-Key": "retry-me-1"}
    first = await api.http.post("/api/v1/runs", json=VALID, headers=headers)
    assert first.status_code == 201
    run_id = first.json()["run_id"]
    # Same body in another key order and spacing: the same request.
    same_body = json.dumps({"workload": {"command": ["echo", "hello"]}, "project": "demo"}, indent=2)
    again = await api.http.post(
        "/api/v1/runs", content=same_body, headers={**headers, "content-type": "application/json"}
    )
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["run_id"] == run_id
    assert await api.runs_stream_count() == 1

    different = await api.http.post("/api/v1/runs", json={**VALID, "priority": "high"}, headers=headers)
    problem = assert_problem(different, 422)
    assert fields_of(problem) == {"Idempotency-Key"}
    assert await api.runs_stream_count() == 1

    # Keys are scoped by project.
    other = await api.http.post("/api/v1/runs", json={**VALID, "project": "other"}, headers=headers)
    assert other.status_code == 201 and other.json()["run_id"] != run_id
    assert await api.runs_stream_count() == 2

    # Concurrent retries: one run, one publish.
    racing = await asyncio.gather(
        *(api.http.post("/api/v1/runs", json=VALID, headers={"Idempotency-Key": "race"}) for _ in range(8))
    )
    assert sorted(r.status_code for r in racing) == [200] * 7 + [201]
    assert len({r.json()["run_id"] for r in racing}) == 1
    assert await api.runs_stream_count() == 3


async def test_an_idempotent_retry_after_a_gateway_restart_still_finds_the_run(nats_url: str) -> None:
    headers = {"Idempotency-Key": "across-restarts"}
    async with started_api(nats_url) as first:
        created = await first.http.post("/api/v1/runs", json=VALID, headers=headers)
        assert created.status_code == 201
    async with started_api(nats_url) as second:
        replay = await second.http.post("/api/v1/runs", json=VALID, headers=headers)
        assert replay.status_code == 200
        assert replay.json()["run_id"] == created.json()["run_id"]
        # Not recorded by a scheduler: the very same event was published again, stored once.
        assert await second.runs_stream_count() == 1


# ------------------------------------------------------------------------------------------------
# errors


async def test_unknown_runs_and_routes_are_problems(api: Api) -> None:
    unknown = new_ulid()
    for method, path in [
        ("GET", f"/api/v1/runs/{unknown}"),
        ("GET", "/api/v1/runs/not-a-run-id"),
        ("POST", f"/api/v1/runs/{unknown}/cancel"),
        ("POST", f"/api/v1/runs/{unknown}/resume"),
        ("GET", f"/api/v1/runs/{unknown}/logs"),
        ("GET", f"/api/v1/runs/{unknown}/events"),
    ]:
        problem = assert_problem(await api.http.request(method, path), 404)
        assert problem["instance"] == path
        assert problem["type"] == "https://fabrik.sh/problems/not-found"
    problem = assert_problem(await api.http.get("/api/v1/nothing-here"), 404)
    assert "GET /api/v1/nothing-here" in problem["detail"]
    response = await api.http.delete("/api/v1/runs")
    assert_problem(response, 405)
    assert "GET" in response.headers["allow"]
    assert await api.runs_stream_count() == 0


# ------------------------------------------------------------------------------------------------
# cancel and resume


async def test_cancel_and_resume_follow_the_state(api: Api) -> None:
    finished = run_record("succeeded")
    running = run_record("running")
    cancelling = run_record("cancelling")
    failed = run_record("failed")
    for record in (finished, running, cancelling, failed):
        await api.put_and_wait(record)

    problem = assert_problem(await api.http.post(f"/api/v1/runs/{finished.run_id}/cancel"), 409)
    assert "succeeded" in problem["detail"]
    problem = assert_problem(await api.http.post(f"/api/v1/runs/{running.run_id}/resume"), 409)
    assert "running" in problem["detail"]
    assert_problem(await api.http.post(f"/api/v1/runs/{finished.run_id}/resume"), 409)
    # An imported run, failed as it may be, has no workspace or image digest to resume from.
    imported = msgspec.structs.replace(run_record("failed"), requested_by="import:smithers:admin")
    await api.put_and_wait(imported)
    problem = assert_problem(await api.http.post(f"/api/v1/runs/{imported.run_id}/resume"), 409)
    assert "was imported (import:smithers:admin)" in problem["detail"]
    assert "an imported run has no workspace or image digest to resume from" in problem["detail"]
    assert await api.runs_stream_count() == 0

    accepted = await api.http.post(f"/api/v1/runs/{running.run_id}/cancel", json={"reason": "not needed"})
    assert accepted.status_code == 202
    assert accepted.json()["action"] == "cancel" and accepted.json()["state"] == "running"
    for _ in range(2):  # cancelling already: accepted again (idempotent)
        assert (await api.http.post(f"/api/v1/runs/{cancelling.run_id}/cancel")).status_code == 202
    resumed = await api.http.post(f"/api/v1/runs/{failed.run_id}/resume")
    assert resumed.status_code == 202 and resumed.json()["action"] == "resume"
    assert await api.runs_stream_count() == 4
    msg = await api.js.get_last_msg("RUNS", f"fabrik.runs.cancel_requested.{running.run_id}")
    assert json.loads(msg.data or b"{}")["reason"] == "not needed"
    await api.js.get_last_msg("RUNS", f"fabrik.runs.resume_requested.{failed.run_id}")

    problem = assert_problem(
        await api.http.post(f"/api/v1/runs/{running.run_id}/cancel", json={"why": 1}), 422
    )
    assert problem["errors"] == [{"field": "why", "rule": "is not a known field"}]


# ------------------------------------------------------------------------------------------------
# listing


async def test_list_pages_through_2000_runs_with_filters(nats_url: str) -> None:
    projects = ["alpha", "beta", "gamma"]
    states = ["queued", "running", "succeeded", "failed"]
    records = [
        run_record(
            states[n % 4],
            project=projects[n % 3],
            labels={"team": "red" if n % 5 == 0 else "blue"},
            run_id=run_id,
        )
        for n, run_id in enumerate(sorted(new_ulid() for _ in range(2000)))
    ]
    # Half is in the bucket before the gateway starts (initial load), half arrives while it runs.
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        kv = await js.key_value("runs")
        for batch in range(0, 1000, 100):
            await asyncio.gather(
                *(kv.put(r.run_id, msgspec.json.encode(r)) for r in records[batch : batch + 100])
            )
    finally:
        await nc.close()
    async with started_api(nats_url) as api:
        assert len(api.gateway.readmodel) == 1000  # ready means loaded
        for batch in range(1000, 2000, 100):
            await asyncio.gather(*(api.put(r) for r in records[batch : batch + 100]))
        await wait_until(lambda: len(api.gateway.readmodel) == 2000)

        async def walk(query: str, limit: int) -> list[str]:
            ids: list[str] = []
            cursor = None
            pages = 0
            while True:
                url = f"/api/v1/runs?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
                page = (await api.http.get(url)).json()
                pages += 1
                ids.extend(r["run_id"] for r in page["items"])
                cursor = page["next_cursor"]
                if cursor is None:
                    assert len(page["items"]) <= limit
                    return ids
                assert len(page["items"]) == limit

        def expected(pred: Callable[[int, RunRecord], bool]) -> list[str]:
            return [r.run_id for n, r in reversed(list(enumerate(records))) if pred(n, r)]

        everything = await walk("", 137)
        assert everything == expected(lambda n, r: True)
        assert len(everything) == len(set(everything)) == 2000
        assert await walk("&project=beta", 50) == expected(lambda n, r: r.project == "beta")
        assert await walk("&state=failed", 500) == expected(lambda n, r: r.state == "failed")
        assert await walk("&state=queued,running", 300) == expected(
            lambda n, r: r.state in ("queued", "running")
        )
        assert await walk("&project=alpha&state=running&label=team=red", 7) == expected(
            lambda n, r: r.project == "alpha" and r.state == "running" and r.params.labels["team"] == "red"
        )
        assert await walk("&label=team=red", 100) == expected(lambda n, r: r.params.labels["team"] == "red")
        default_page = (await api.http.get("/api/v1/runs")).json()
        assert len(default_page["items"]) == 50

        problem = assert_problem(await api.http.get("/api/v1/runs?limit=501"), 400)
        assert fields_of(problem) == {"limit"}
        problem = assert_problem(
            await api.http.get("/api/v1/runs?limit=0&cursor=garbage&state=sleeping&project=Nope&label=x"), 400
        )
        assert fields_of(problem) == {"limit", "cursor", "state", "project", "label"}

        summary = {p["project"]: p for p in (await api.http.get("/api/v1/projects")).json()["items"]}
        assert set(summary) == set(projects)
        assert sum(p["total"] for p in summary.values()) == 2000
        assert summary["alpha"]["states"]["queued"] == sum(
            1 for r in records if r.project == "alpha" and r.state == "queued"
        )


# ------------------------------------------------------------------------------------------------
# queue


async def test_queue_from_the_schedulers_snapshot(api: Api) -> None:
    empty = (await api.http.get("/api/v1/queue")).json()
    assert empty == {"taken_at": None, "total": 0, "running": 0, "items": [], "usage": {}, "limits": {}}

    queued = [run_record("queued", project="alpha" if n % 2 else "beta") for n in range(30)]
    for record in queued:
        await api.put(record)
    await wait_until(lambda: all(api.gateway.readmodel.get(r.run_id) for r in queued))
    taken_at = datetime.now(UTC).replace(microsecond=0)
    snapshot = QueueSnapshot(
        taken_at=taken_at,
        entries=[
            QueueEntry(run_id=r.run_id, project=r.project, priority="normal", eta_seconds=60.0 * i)
            for i, r in enumerate(queued)
        ],
        total=30,
        running=4,
        usage={"alpha": {"runs": 2, "cpu": 1.0}},
        limits={"alpha": {"runs": 100, "cpu": 100.0}},
    )
    await api.queue_kv.put("snapshot", msgspec.json.encode(snapshot))
    await wait_until(lambda: api.gateway.readmodel.queue_view().total == 30)

    view = (await api.http.get("/api/v1/queue")).json()
    assert [(i["position"], i["run_id"]) for i in view["items"]] == [
        (n + 1, r.run_id) for n, r in enumerate(queued)
    ]
    assert (
        view["running"] == 4
        and view["usage"]["alpha"]["cpu"] == 1.0
        and view["limits"]["alpha"]["runs"] == 100
    )
    assert datetime.fromisoformat(view["items"][2]["eta"]) == taken_at + timedelta(seconds=120)
    alpha = (await api.http.get("/api/v1/queue?project=alpha&limit=3")).json()["items"]
    assert [i["position"] for i in alpha] == [2, 4, 6]

    run = (await api.http.get(f"/api/v1/runs/{queued[25].run_id}")).json()
    assert run["queue"]["position"] == 26
    assert run["queue"]["ahead_count"] == 25
    assert run["queue"]["ahead"] == [r.run_id for r in queued[:20]]
    assert datetime.fromisoformat(run["queue"]["eta"]) == taken_at + timedelta(seconds=25 * 60)
    assert_problem(await api.http.get("/api/v1/queue?limit=x"), 400)


# ------------------------------------------------------------------------------------------------
# logs


def chunk(run_id: str, first_line: int, count: int, attempt: int = 1) -> RunLogChunk:
    return RunLogChunk(
        run_id=run_id,
        attempt=attempt,
        first_line=first_line,
        lines=tuple(
            LogLine(
                ts=utcnow(), stream="stdout" if i % 3 else "stderr", text=f"a{attempt} line {first_line + i}"
            )
            for i in range(count)
        ),
    )


async def read_sse(response: httpx.Response, into: list[dict[str, str]]) -> None:
    event: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if event:
                into.append(event)
                event = {}
            continue
        field, _, value = line.partition(":")
        event[field or "comment"] = value.removeprefix(" ")


async def test_logs_tail_and_follow_until_the_run_ends(api: Api) -> None:
    record = run_record("running")
    await api.put_and_wait(record)
    other = run_record("running")
    line = 0
    for size in (5, 12, 1, 30, 7):  # 55 lines, interleaved with another run's chunks
        await api.publish(chunk(record.run_id, line, size))
        await api.publish(chunk(other.run_id, line, 3))
        line += size

    logs = (await api.http.get(f"/api/v1/runs/{record.run_id}/logs?tail=10")).json()
    assert [entry["line"] for entry in logs["lines"]] == list(range(45, 55))
    assert logs["lines"][-1]["text"] == "a1 line 54" and logs["lines"][-1]["attempt"] == 1
    assert logs["truncated"] is True
    everything = (await api.http.get(f"/api/v1/runs/{record.run_id}/logs")).json()
    assert [entry["line"] for entry in everything["lines"]] == list(range(55))
    assert everything["truncated"] is False
    assert (await api.http.get(f"/api/v1/runs/{record.run_id}/logs?tail=0")).json()["lines"] == []
    problem = assert_problem(
        await api.http.get(f"/api/v1/runs/{record.run_id}/logs?tail=-1&follow=maybe"), 400
    )
    assert fields_of(problem) == {"tail", "follow"}

    events: list[dict[str, str]] = []
    async with api.http.stream("GET", f"/api/v1/runs/{record.run_id}/logs?follow=true&tail=3") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = asyncio.create_task(read_sse(response, events))
        await wait_until(lambda: len([e for e in events if e.get("event") == "line"]) == 3)
        await api.publish(chunk(record.run_id, 55, 4))
        await wait_until(lambda: len([e for e in events if e.get("event") == "line"]) == 7)
        await asyncio.sleep(0.7)  # idle: a keep-alive comment
        await api.put(run_record("succeeded", run_id=record.run_id, revision=2))
        await api.publish(chunk(record.run_id, 59, 2))  # the last words, right at the end
        await asyncio.wait_for(reader, 10)
    lines = [json.loads(e["data"]) for e in events if e.get("event") == "line"]
    assert [entry["line"] for entry in lines] == list(range(52, 61))
    assert all(e["id"] for e in events if e.get("event") == "line")
    assert any(e.get("comment") == "keep-alive" for e in events)
    end = events[-1]
    assert end["event"] == "end" and json.loads(end["data"]) == {"reason": "finished", "state": "succeeded"}

    # Resuming a stream with Last-Event-ID continues after that line.
    resume_from = next(
        e["id"] for e in events if e.get("event") == "line" and json.loads(e["data"])["line"] == 57
    )
    resumed: list[dict[str, str]] = []
    async with api.http.stream(
        "GET", f"/api/v1/runs/{record.run_id}/logs?follow=true", headers={"Last-Event-ID": resume_from}
    ) as response:
        await asyncio.wait_for(read_sse(response, resumed), 10)
    assert [json.loads(e["data"])["line"] for e in resumed if e.get("event") == "line"] == [58, 59, 60]


async def test_tail_spans_attempts(api: Api) -> None:
    record = run_record("failed")
    await api.put_and_wait(record)
    await api.publish(chunk(record.run_id, 0, 10, attempt=1))
    await api.publish(chunk(record.run_id, 0, 4, attempt=2))
    logs = (await api.http.get(f"/api/v1/runs/{record.run_id}/logs?tail=6")).json()["lines"]
    assert [(e["attempt"], e["line"]) for e in logs] == [(1, 8), (1, 9), (2, 0), (2, 1), (2, 2), (2, 3)]


async def test_a_chunk_published_twice_is_shown_once(api: Api) -> None:
    """After an executor crash the last chunk may be published again with the same first_line."""
    record = run_record("succeeded")
    await api.put_and_wait(record)
    await api.publish(chunk(record.run_id, 0, 5))
    await api.publish(chunk(record.run_id, 5, 3))
    await api.publish(chunk(record.run_id, 5, 3))  # the repeat (a new event id: a new message)
    await api.publish(chunk(record.run_id, 8, 2))
    logs = (await api.http.get(f"/api/v1/runs/{record.run_id}/logs")).json()["lines"]
    assert [e["line"] for e in logs] == list(range(10))
    events: list[dict[str, str]] = []
    async with api.http.stream("GET", f"/api/v1/runs/{record.run_id}/logs?follow=true") as response:
        await asyncio.wait_for(read_sse(response, events), 10)
    assert [json.loads(e["data"])["line"] for e in events if e.get("event") == "line"] == list(range(10))


# ------------------------------------------------------------------------------------------------
# events


async def test_events_of_a_run_in_order(api: Api) -> None:
    created = (await api.http.post("/api/v1/runs", json=VALID)).json()
    run_id = created["run_id"]
    other = (await api.http.post("/api/v1/runs", json=VALID)).json()["run_id"]
    await api.publish(RunQueued(run_id=run_id, project="demo", attempt=1))
    await api.publish(RunQueued(run_id=other, project="demo", attempt=1))
    await api.publish(
        RunStateChanged(run_id=run_id, project="demo", attempt=1, from_state="queued", to_state="starting")
    )
    assert (await api.http.post(f"/api/v1/runs/{run_id}/cancel")).status_code == 202

    page = (await api.http.get(f"/api/v1/runs/{run_id}/events")).json()
    types = [item["type"] for item in page["items"]]
    assert types == ["run.requested", "run.queued", "run.state_changed", "run.cancel_requested"]
    assert all(item["event"]["run_id"] == run_id for item in page["items"])
    seqs = [item["seq"] for item in page["items"]]
    assert seqs == sorted(seqs)
    assert page["items"][2]["event"]["to_state"] == "starting"
    assert page["next_cursor"] is None

    first = (await api.http.get(f"/api/v1/runs/{run_id}/events?limit=2")).json()
    assert [i["type"] for i in first["items"]] == types[:2] and first["next_cursor"]
    rest = (await api.http.get(f"/api/v1/runs/{run_id}/events?after={first['next_cursor']}")).json()
    assert [i["type"] for i in rest["items"]] == types[2:]
    fresh = run_record("running")
    await api.put_and_wait(fresh)
    assert (await api.http.get(f"/api/v1/runs/{fresh.run_id}/events")).json()["items"] == []


# ------------------------------------------------------------------------------------------------
# service


async def test_openapi_readiness_and_metrics(api: Api) -> None:
    document = (await api.http.get("/api/v1/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    assert {"/api/v1/runs", "/api/v1/runs/{run_id}", "/api/v1/queue", "/api/v1/projects"} <= set(
        document["paths"]
    )
    submit = document["paths"]["/api/v1/runs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("SubmitRunRequest")
    assert document["components"]["schemas"]["SubmitRunRequest"]["additionalProperties"] is False
    readiness = (await api.http.get("/readyz")).json()
    assert readiness["checks"]["read_model"] is True
    await api.http.get("/api/v1/runs")
    metrics = (await api.http.get("/metrics")).text
    assert 'fabrik_http_requests_total{method="GET",route="/api/v1/runs",status="200"}' in metrics


async def test_followed_logs_end_cleanly_when_the_gateway_stops(nats_url: str) -> None:
    service = build(gateway_settings(nats_url, logs_heartbeat_seconds=60))
    await service.start()
    nc = await nats.connect(nats_url)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http.port}", timeout=20)
    try:
        await wait_until(lambda: _ready(http))
        record = run_record("running")
        await (await nc.jetstream().key_value("runs")).put(record.run_id, msgspec.json.encode(record))
        await wait_until(lambda: service.state.readmodel.get(record.run_id) is not None)
        events: list[dict[str, str]] = []
        async with http.stream("GET", f"/api/v1/runs/{record.run_id}/logs?follow=true") as response:
            reader = asyncio.create_task(read_sse(response, events))
            await wait_until(lambda: service.state.followers == 1)
            started = time.monotonic()
            await service.stop()
            await asyncio.wait_for(reader, 10)
        assert time.monotonic() - started < 5
        assert events[-1]["event"] == "end"
        assert json.loads(events[-1]["data"])["reason"] == "shutdown"
    finally:
        await http.aclose()
        await nc.close()
