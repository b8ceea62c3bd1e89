"""Project environments over a real NATS server: the gateway's env endpoints (gateway in this
process), the audit trail they leave, the encrypted store, and the executor's local backend
starting a run with a project environment read from the store."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from fabrik_common.codec import decode_any
from fabrik_common.envs import ENVS_BUCKET, EnvCipher, generate_env_key, read_env
from fabrik_common.events import (
    AuditRecorded,
    Resources,
    RunDispatched,
    RunFinished,
    RunLogChunk,
    RunParameters,
    Workload,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_executor.app import build as build_executor
from fabrik_executor.settings import ExecutorSettings
from fabrik_gateway.app import build as build_gateway
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.settings import GatewaySettings

KEY = generate_env_key()
SECRET = "s3cr3t-value-never-logged"


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


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://fabrik.sh/problems/")
    assert body["instance"] == response.request.url.path
    return body


def fields_of(problem: dict[str, Any]) -> list[str]:
    return [e["field"] for e in problem.get("errors", [])]


class AuditLog:
    """Every `fabrik.audit.recorded` event, through a durable pull consumer on OPS."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.events: list[AuditRecorded] = []
        self.raw: list[bytes] = []
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.js.pull_subscribe(AuditRecorded.SUBJECT, durable="test-audit", stream="OPS")

    async def poll(self) -> list[AuditRecorded]:
        while True:
            try:
                msgs = await self._sub.fetch(100, timeout=0.2)
            except (TimeoutError, nats.errors.Error):
                break
            for msg in msgs:
                self.raw.append(msg.data)
                event = decode_any(msg.data)
                assert isinstance(event, AuditRecorded)
                self.events.append(event)
                await msg.ack()
        return self.events

    async def wait_for(self, count: int) -> list[AuditRecorded]:
        deadline = time.monotonic() + 10
        while len(await self.poll()) < count:
            assert time.monotonic() < deadline, f"audit events: {self.events}"
        return self.events


@dataclass
class Api:
    http: httpx.AsyncClient
    service: Service[Gateway]
    nc: NatsClient
    js: JetStreamContext
    kv: KeyValue
    audit: AuditLog

    def path(self, project: str = "demo", env: str | None = "dev", *rest: str) -> str:
        base = f"/api/v1/projects/{project}/envs"
        return "/".join([base, *([env] if env is not None else []), *rest])

    async def put(self, env: str = "dev", project: str = "demo", **body: Any) -> httpx.Response:
        return await self.http.put(self.path(project, env), json=body)


@contextlib.asynccontextmanager
async def started_api(nats_url: str, **overrides: Any) -> AsyncIterator[Api]:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "http_port": 0,
        "log_format": "text",
        "anonymous_role": "admin",
        "env_encryption_key": KEY,
        **overrides,
    }
    service = build_gateway(GatewaySettings(**values))
    async with running_service(service):
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        audit = AuditLog(js)
        await audit.start()
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http.port}", timeout=20)
        try:
            yield Api(http, service, nc, js, await js.key_value(ENVS_BUCKET), audit)
        finally:
            await http.aclose()
            await nc.close()


@pytest.fixture
async def api(nats_url: str) -> AsyncIterator[Api]:
    async with started_api(nats_url) as value:
        yield value


# --------------------------------------------------------------------------------------------
# set: merge, replace, unset


async def test_merge_replace_and_unset(api: Api) -> None:
    created = await api.put(values={"A": "1", "B": "2"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["created"] is True
    assert body["mode"] == "merge"
    assert body["keys"] == ["A", "B"]
    assert body["revision"] == 1
    assert body["changes"] == {"added": ["A", "B"], "changed": [], "removed": []}
    assert body["updated_by"] == "anonymous"

    merged = await api.put(values={"B": "two", "C": "3"})
    assert merged.status_code == 200
    assert merged.json()["changes"] == {"added": ["C"], "changed": ["B"], "removed": []}
    assert merged.json()["keys"] == ["A", "B", "C"]

    unset = await api.put(unset=["A", "NOT_THERE"])
    assert unset.json()["changes"] == {"added": [], "changed": [], "removed": ["A"]}
    assert unset.json()["revision"] == 3

    shown = (await api.http.get(api.path(), params={"reveal": "true"})).json()
    assert shown["values"] == {"B": "two", "C": "3"}

    replaced = await api.put(values={"Z": "26"}, replace=True)
    assert replaced.json()["mode"] == "replace"
    assert replaced.json()["changes"] == {"added": ["Z"], "changed": [], "removed": ["B", "C"]}
    assert (await api.http.get(api.path(), params={"reveal": "true"})).json()["values"] == {"Z": "26"}

    # the same values again change nothing: no new revision, no audit event
    again = await api.put(values={"Z": "26"})
    assert again.json()["changes"] == {"added": [], "changed": [], "removed": []}
    assert again.json()["revision"] == 4
    events = await api.audit.wait_for(6)
    await asyncio.sleep(0.3)
    assert [e.action for e in await api.audit.poll()] == [
        "env.set", "env.set", "env.set", "env.reveal", "env.set", "env.reveal",
    ]  # fmt: skip
    assert [e.details.get("mode") for e in events if e.action == "env.set"] == [
        "merge",
        "merge",
        "merge",
        "replace",
    ]


async def test_get_shows_keys_only_unless_revealed(api: Api) -> None:
    await api.put(values={"DATABASE_URL": SECRET, "LOG_LEVEL": "debug"})
    view = (await api.http.get(api.path())).json()
    assert view["keys"] == ["DATABASE_URL", "LOG_LEVEL"]
    assert view["values"] is None
    assert view["protected"] is False
    assert SECRET not in (await api.http.get(api.path())).text
    revealed = (await api.http.get(api.path(), params={"reveal": "true"})).json()
    assert revealed["values"]["DATABASE_URL"] == SECRET
    assert_problem(await api.http.get(api.path(env="nope")), 404)
    bad = assert_problem(await api.http.get(api.path(), params={"reveal": "maybe"}), 400)
    assert fields_of(bad) == ["reveal"]


async def test_values_are_encrypted_at_rest(api: Api) -> None:
    await api.put(values={"TOKEN": SECRET})
    raw = (await api.kv.get("demo.dev")).value or b""
    assert SECRET.encode() not in raw
    stored = msgspec.json.decode(raw)
    assert set(stored) == {"format", "values", "updated_at", "updated_by", "revision", "key_id"}
    assert list(stored["values"]) == ["TOKEN"]
    assert await read_env(api.js, "demo", "dev", EnvCipher.from_text(KEY)) == {"TOKEN": SECRET}


async def test_list_envs(api: Api) -> None:
    assert (await api.http.get(api.path(env=None))).json() == {"project": "demo", "items": []}
    await api.put(values={"A": "1"})
    await api.put("staging", values={"A": "1", "B": "2"})
    await api.put("dev", "other", values={"X": "1"})
    listing = (await api.http.get(api.path(env=None))).json()
    assert [(i["env"], i["keys"], i["revision"], i["protected"]) for i in listing["items"]] == [
        ("dev", 1, 1, False),
        ("staging", 2, 1, False),
    ]


async def test_delete(api: Api) -> None:
    await api.put(values={"A": "1"})
    deleted = await api.http.delete(api.path())
    assert deleted.status_code == 200
    assert deleted.json() == {
        "project": "demo",
        "env": "dev",
        "deleted": True,
        "removed": ["A"],
        "revision": 1,
    }
    assert_problem(await api.http.get(api.path()), 404)
    assert_problem(await api.http.delete(api.path()), 404)
    again = await api.put(values={"B": "2"})
    assert again.status_code == 201
    assert again.json()["revision"] == 1


async def test_expected_revision(api: Api) -> None:
    assert (await api.put(values={"A": "1"}, expected_revision=0)).status_code == 201
    stale = assert_problem(await api.put(values={"A": "2"}, expected_revision=0), 412)
    assert stale["type"].endswith("/revision-mismatch")
    assert (await api.put(values={"A": "2"}, expected_revision=1)).status_code == 200


async def test_concurrent_merges_all_land(api: Api) -> None:
    results = await asyncio.gather(*(api.put(values={f"K{i}": str(i)}) for i in range(8)))
    assert all(r.status_code in (200, 201) for r in results), [r.text for r in results]
    view = (await api.http.get(api.path())).json()
    assert view["keys"] == [f"K{i}" for i in range(8)]
    assert view["revision"] == 8


# --------------------------------------------------------------------------------------------
# validation: every invalid field named; nothing stored, nothing published


async def test_reserved_and_invalid_keys_are_422_naming_each(api: Api) -> None:
    response = await api.put(
        values={"FABRIK_TOKEN": "x", "smithers_id": "y", "bad-key": "z", "OK": "1", "NUM": 5},
        unset=["FABRIK_RUN_ID"],
        extra=True,
    )
    problem = assert_problem(response, 422)
    assert set(fields_of(problem)) == {
        "values.FABRIK_TOKEN",
        "values.smithers_id",
        "values.bad-key",
        "values.NUM",
        "unset[0]",
        "extra",
    }
    rules = {e["field"]: e["rule"] for e in problem["errors"]}
    assert "reserved" in rules["values.FABRIK_TOKEN"]
    assert "environment variable name" in rules["values.bad-key"]
    assert_problem(await api.http.get(api.path()), 404)  # nothing stored
    await asyncio.sleep(0.2)
    assert await api.audit.poll() == []  # nothing published


async def test_names_are_dns_labels_400(api: Api) -> None:
    problem = assert_problem(
        await api.http.put("/api/v1/projects/Demo/envs/Dev_1", json={"values": {"A": "1"}}), 400
    )
    assert set(fields_of(problem)) == {"project", "env"}
    assert "DNS-1123" in problem["errors"][0]["rule"]
    problem = assert_problem(await api.http.get("/api/v1/projects/demo/envs/UPPER"), 400)
    assert fields_of(problem) == ["env"]
    problem = assert_problem(await api.http.get("/api/v1/projects/de..mo/envs"), 400)
    assert fields_of(problem) == ["project"]


async def test_body_rules(api: Api) -> None:
    assert fields_of(assert_problem(await api.put(), 422)) == ["values"]
    both = assert_problem(await api.put(values={"A": "1"}, unset=["A"]), 422)
    assert fields_of(both) == ["unset[0]"]
    combo = assert_problem(await api.put(values={"A": "1"}, unset=["B"], replace=True), 422)
    assert fields_of(combo) == ["unset"]
    nul = assert_problem(await api.put(values={"A": "x\x00y"}), 422)
    assert fields_of(nul) == ["values.A"]
    malformed = await api.http.put(api.path(), content=b"{nope", headers={"content-type": "application/json"})
    assert fields_of(assert_problem(malformed, 400)) == ["body"]


async def test_size_limits(nats_url: str) -> None:
    async with started_api(nats_url, env_max_value_bytes=10, env_max_keys=2, env_max_total_bytes=1024) as api:
        too_big = assert_problem(await api.put(values={"A": "x" * 11}), 422)
        assert fields_of(too_big) == ["values.A"]
        assert "at most 10 bytes" in too_big["errors"][0]["rule"]
        await api.put(values={"A": "1", "B": "2"})
        too_many = assert_problem(await api.put(values={"C": "3"}), 422)
        assert "at most 2" in too_many["errors"][0]["rule"]


# --------------------------------------------------------------------------------------------
# protected environments, roles, audit


async def test_protected_env_needs_confirmation(api: Api) -> None:
    refused = assert_problem(await api.put("prod", values={"A": "1"}), 428)
    assert refused["type"].endswith("/confirmation-required")
    assert "confirm" in refused["detail"]
    assert_problem(await api.http.get(api.path(env="prod")), 404)  # nothing written
    for env in ("production", "live"):
        assert_problem(await api.put(env, values={"A": "1"}), 428)

    confirmed = await api.put("prod", values={"A": "1"}, confirm=True)
    assert confirmed.status_code == 201
    assert confirmed.json()["protected"] is True
    header = await api.http.put(
        api.path(env="prod"), json={"values": {"B": "2"}}, headers={"Fabrik-Confirm": "prod"}
    )
    assert header.status_code == 200
    wrong_header = await api.http.put(
        api.path(env="prod"), json={"values": {"C": "3"}}, headers={"Fabrik-Confirm": "staging"}
    )
    assert_problem(wrong_header, 428)

    assert_problem(await api.http.delete(api.path(env="prod")), 428)
    assert (await api.http.delete(api.path(env="prod"), params={"confirm": "true"})).status_code == 200


@pytest.mark.parametrize(
    ("role", "dev_write", "prod_write", "reveal_prod"),
    [("viewer", 403, 403, 403), ("developer", 201, 403, 403), ("maintainer", 201, 200, 200)],
)
async def test_roles(nats_url: str, role: str, dev_write: int, prod_write: int, reveal_prod: int) -> None:
    async with started_api(nats_url, anonymous_role="admin") as admin:
        await admin.put("prod", values={"P": SECRET}, confirm=True)
    async with started_api(nats_url, anonymous_role=role) as api:
        assert (await api.http.get(api.path(env="prod"))).status_code == 200  # key names: viewers too
        assert (await api.put("dev", values={"A": "1"})).status_code == dev_write
        response = await api.put("prod", values={"A": "1"}, confirm=True)
        assert response.status_code == prod_write
        if prod_write == 403:
            problem = assert_problem(response, 403)
            assert "maintainer" in problem["detail"]
            assert "FABRIK_ANONYMOUS_ROLE" in problem["detail"]
        assert (
            await api.http.get(api.path(env="prod"), params={"reveal": "true"})
        ).status_code == reveal_prod
        events = await api.audit.poll()
        denied = [e for e in events if e.result == "denied"]
        assert all(e.role == role and e.actor == "anonymous" for e in denied)
        if prod_write == 403:
            assert any(e.action == "env.set" and e.target == "env:demo/prod" for e in denied)


async def test_no_anonymous_access(nats_url: str) -> None:
    async with started_api(nats_url, anonymous_role="none") as api:
        problem = assert_problem(await api.http.get(api.path(env=None)), 401)
        assert "FABRIK_ANONYMOUS_ROLE=none" in problem["detail"]


async def test_audit_events_name_keys_never_values(api: Api) -> None:
    await api.put(values={"DB": SECRET, "LOG": "debug"})
    await api.put(values={"DB": SECRET + "2"}, unset=["LOG"])
    await api.put("prod", values={"DB": SECRET}, replace=True, confirm=True)
    await api.http.get(api.path(), params={"reveal": "true"})
    await api.http.delete(api.path())
    events = await api.audit.wait_for(5)
    assert all(SECRET.encode() not in raw for raw in api.audit.raw)
    first, second, third, reveal, delete = events
    assert (first.action, first.actor, first.role, first.target, first.project, first.result) == (
        "env.set", "anonymous", "admin", "env:demo/dev", "demo", "ok",
    )  # fmt: skip
    assert first.details["mode"] == "merge"
    assert first.details["added"] == ["DB", "LOG"]
    assert first.details["keys"] == ["DB", "LOG"]
    assert second.details["changed"] == ["DB"]
    assert second.details["removed"] == ["LOG"]
    assert second.details["unset"] == ["LOG"]
    assert third.details["mode"] == "replace"
    assert third.details["protected"] is True
    assert reveal.action == "env.reveal"
    assert reveal.details["keys"] == ["DB"]
    assert delete.action == "env.delete"
    assert delete.details["removed"] == ["DB"]
    assert first.occurred_at <= delete.occurred_at


# --------------------------------------------------------------------------------------------
# diff and promote


async def test_diff_key_names_only(api: Api) -> None:
    await api.put("staging", values={"A": "1", "B": "2", "C": "3"})
    await api.put("prod", values={"B": "2", "C": "changed", "D": SECRET}, confirm=True)
    for method in ("GET", "POST"):
        response = await api.http.request(
            method, api.path(env=None) + "/diff", params={"from": "staging", "to": "prod"}
        )
        assert response.status_code == 200, response.text
        diff = response.json()
        assert diff == {
            "project": "demo",
            "from": "staging",
            "to": "prod",
            "added": ["A"],
            "removed": ["D"],
            "changed": ["C"],
            "unchanged": 1,
            "from_revision": 1,
            "to_revision": 1,
        }
        assert SECRET not in response.text
    to_new = (await api.http.get(api.path(env=None) + "/diff", params={"from": "staging", "to": "qa"})).json()
    assert to_new["added"] == ["A", "B", "C"]
    assert to_new["to_revision"] == 0
    assert_problem(
        await api.http.get(api.path(env=None) + "/diff", params={"from": "nope", "to": "prod"}), 404
    )
    missing = assert_problem(
        await api.http.get(api.path(env=None) + "/diff", params={"from": "staging"}), 400
    )
    assert fields_of(missing) == ["to"]


async def test_promote_previews_then_applies(api: Api) -> None:
    await api.put("staging", values={"A": "1", "B": "2"})
    await api.put("prod", values={"B": "old", "Z": "only-prod"}, confirm=True)
    url = api.path(env=None) + "/promote"

    preview = await api.http.post(url, json={"from": "staging", "to": "prod"})
    assert preview.status_code == 200
    body = preview.json()
    assert body["applied"] is False
    assert body["revision"] is None
    assert body["mode"] == "replace"
    assert (body["diff"]["added"], body["diff"]["removed"], body["diff"]["changed"]) == (["A"], ["Z"], ["B"])
    prod = (await api.http.get(api.path(env="prod"), params={"reveal": "true"})).json()
    assert prod["values"] == {"B": "old", "Z": "only-prod"}

    # what the preview showed must still hold
    await api.put("staging", values={"C": "3"})
    stale = await api.http.post(
        url,
        json={
            "from": "staging",
            "to": "prod",
            "confirm": True,
            "from_revision": body["diff"]["from_revision"],
        },
    )
    assert_problem(stale, 412)

    applied = await api.http.post(url, json={"from": "staging", "to": "prod", "confirm": True})
    assert applied.status_code == 200, applied.text
    assert applied.json()["applied"] is True
    assert applied.json()["revision"] == 2
    prod = (await api.http.get(api.path(env="prod"), params={"reveal": "true"})).json()
    assert prod["values"] == {"A": "1", "B": "2", "C": "3"}
    promote_events = [e for e in await api.audit.poll() if e.action == "env.promote"]
    assert len(promote_events) == 1
    assert promote_events[0].target == "env:demo/prod"
    assert promote_events[0].details["source"] == "staging"
    assert promote_events[0].details["removed"] == ["Z"]


async def test_promote_merge_and_rules(api: Api) -> None:
    await api.put("dev", values={"A": "1"})
    await api.put("qa", values={"Q": "q"})
    url = api.path(env=None) + "/promote"
    merged = await api.http.post(url, json={"from": "dev", "to": "qa", "merge": True, "confirm": True})
    assert merged.json()["diff"]["removed"] == []
    assert (await api.http.get(api.path(env="qa"))).json()["keys"] == ["A", "Q"]
    same = assert_problem(await api.http.post(url, json={"from": "dev", "to": "dev"}), 422)
    assert fields_of(same) == ["to"]
    bad = assert_problem(await api.http.post(url, json={"from": "Dev", "to": "diff"}), 422)
    assert set(fields_of(bad)) == {"from", "to"}
    assert_problem(await api.http.post(url, json={"from": "missing", "to": "qa"}), 404)


async def test_promote_into_protected_needs_maintainer(nats_url: str) -> None:
    async with started_api(nats_url) as admin:
        await admin.put("staging", values={"A": "1"})
    async with started_api(nats_url, anonymous_role="developer") as api:
        url = api.path(env=None) + "/promote"
        preview = await api.http.post(url, json={"from": "staging", "to": "prod"})
        assert preview.status_code == 200  # previews are reads
        assert_problem(await api.http.post(url, json={"from": "staging", "to": "prod", "confirm": True}), 403)
        assert_problem(await api.http.get(api.path(env="prod")), 404)


# --------------------------------------------------------------------------------------------
# keys: none configured, refusing to start


async def test_without_a_key_the_env_endpoints_answer_503(nats_url: str) -> None:
    async with started_api(nats_url, env_encryption_key="") as api:
        problem = assert_problem(await api.put(values={"A": "1"}), 503)
        assert problem["type"].endswith("/env-store-not-configured")
        assert "FABRIK_ENV_ENCRYPTION_KEY" in problem["detail"]
        assert (await api.http.get(api.path(env=None))).status_code == 200


async def test_gateway_refuses_to_start_without_a_key_once_envs_are_stored(nats_url: str) -> None:
    async with started_api(nats_url) as api:
        await api.put(values={"A": "1"})
    service = build_gateway(GatewaySettings(nats_url=nats_url, http_port=0, log_format="text"))
    with pytest.raises(SystemExit) as exited:
        await service.start()
    assert exited.value.code == 2


async def test_a_wrong_key_is_an_error_not_a_silent_empty_env(nats_url: str) -> None:
    async with started_api(nats_url) as api:
        await api.put(values={"A": "1"})
    async with started_api(nats_url, env_encryption_key=generate_env_key()) as api:
        problem = assert_problem(await api.http.get(api.path(), params={"reveal": "true"}), 500)
        assert problem["type"].endswith("/env-unreadable")
        assert "cannot be decrypted" in problem["detail"]
        assert (await api.http.get(api.path())).json()["keys"] == ["A"]  # key names need no key


# --------------------------------------------------------------------------------------------
# the executor reads the project environment from the store


class RunRecorder:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.events: list[Any] = []
        self._subs: list[Any] = []

    async def start(self) -> None:
        self._subs = [
            await self.js.pull_subscribe("fabrik.runs.>", durable="test-env-runs", stream="RUNS"),
            await self.js.pull_subscribe("fabrik.logs.>", durable="test-env-logs", stream="LOGS"),
        ]

    async def finished(self, run_id: str, timeout: float = 30.0) -> RunFinished:
        deadline = time.monotonic() + timeout
        while True:
            for sub in self._subs:
                try:
                    msgs = await sub.fetch(100, timeout=0.1)
                except (TimeoutError, nats.errors.Error):
                    continue
                for msg in msgs:
                    self.events.append(decode_any(msg.data))
                    await msg.ack()
            done = [e for e in self.events if isinstance(e, RunFinished) and e.run_id == run_id]
            if done:
                return done[0]
            assert time.monotonic() < deadline, f"run {run_id} did not finish: {self.events[-10:]}"

    def output(self, run_id: str) -> list[str]:
        return [
            line.text
            for e in self.events
            if isinstance(e, RunLogChunk) and e.run_id == run_id
            for line in e.lines
        ]


def _dispatch(
    command: list[str], env: str = "dev", workload_env: dict[str, str] | None = None
) -> RunDispatched:
    return RunDispatched(
        run_id=new_ulid(),
        project="demo",
        env=env,
        attempt=1,
        params=RunParameters(
            workload=Workload(command=tuple(command), env=workload_env or {}),
            resources=Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="1Gi"),
            timeout_seconds=60,
        ),
        deadline=utcnow() + timedelta(seconds=60),
    )


PRINT_ENV = [
    sys.executable,
    "-c",
    "import os; print('DB=' + os.environ.get('DB', '<unset>')); "
    "print('MODE=' + os.environ.get('MODE', '<unset>'))",
]


async def test_executor_starts_a_run_with_the_project_env_from_the_store(
    nats_url: str, tmp_path: Path
) -> None:
    async with started_api(nats_url) as api:
        await api.put(values={"DB": "postgres://db/demo", "MODE": "project"})
        recorder = RunRecorder(api.js)
        await recorder.start()
        settings = ExecutorSettings(
            nats_url=nats_url,
            http_port=0,
            data_dir=str(tmp_path / "data"),
            log_format="text",
            env_encryption_key=KEY,
            shutdown_grace_seconds=2.0,
        )
        async with running_service(build_executor(settings)) as executor:
            run = _dispatch(PRINT_ENV, workload_env={"MODE": "workload"})  # the run's own env wins
            await executor.bus.publish(run)
            finished = await recorder.finished(run.run_id)
            assert finished.outcome == "succeeded", recorder.output(run.run_id)
            assert "DB=postgres://db/demo" in recorder.output(run.run_id)
            assert "MODE=workload" in recorder.output(run.run_id)

            other = _dispatch(PRINT_ENV, env="qa")  # no such environment: nothing added
            await executor.bus.publish(other)
            assert (await recorder.finished(other.run_id)).outcome == "succeeded"
            assert "DB=<unset>" in recorder.output(other.run_id)


async def test_executor_fails_a_run_whose_env_it_cannot_decrypt(nats_url: str, tmp_path: Path) -> None:
    async with started_api(nats_url) as api:
        await api.put(values={"DB": "x"})
        recorder = RunRecorder(api.js)
        await recorder.start()
        settings = ExecutorSettings(
            nats_url=nats_url,
            http_port=0,
            data_dir=str(tmp_path / "data"),
            log_format="text",
            env_encryption_key=generate_env_key(),  # not the gateway's
            shutdown_grace_seconds=2.0,
        )
        async with running_service(build_executor(settings)) as executor:
            run = _dispatch(PRINT_ENV)
            await executor.bus.publish(run)
            finished = await recorder.finished(run.run_id)
            assert (finished.outcome, finished.reason) == ("failed", "infra_error")
            assert "cannot be decrypted" in finished.message
            assert any("project environment" in line for line in recorder.output(run.run_id))


async def test_executor_refuses_to_start_without_a_key_once_envs_are_stored(
    nats_url: str, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_url)
    try:
        await ensure_topology(nc.jetstream())
    finally:
        await nc.close()
    settings = ExecutorSettings(
        nats_url=nats_url, http_port=0, data_dir=str(tmp_path / "a"), log_format="text"
    )
    async with running_service(build_executor(settings)):
        pass  # nothing stored: starts without a key
    async with started_api(nats_url) as api:
        await api.put(values={"A": "1"})
    service = build_executor(
        ExecutorSettings(nats_url=nats_url, http_port=0, data_dir=str(tmp_path / "b"), log_format="text")
    )
    with pytest.raises(SystemExit) as exited:
        await service.start()
    assert exited.value.code == 2
