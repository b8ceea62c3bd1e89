"""contracts/ is generated from the code: the committed files must be what the code generates now."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fabrik_common.bus import dead_letter_subject
from fabrik_common.codec import all_event_types
from fabrik_common.contracts import (
    EVENT_ROLES,
    SERVICES,
    check_contracts,
    event_schemas,
    iter_refs,
    resolve_ref,
    write_contracts,
)
from fabrik_common.topology import STREAMS, subject_matches

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "contracts.py"
CONTRACTS = ROOT / "contracts"
REGENERATE = "regenerate with: uv run python scripts/contracts.py write"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fabrik_contracts_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def openapi(script: ModuleType) -> dict[str, Any]:
    document = script.openapi_document()
    assert isinstance(document, dict)
    return document


def _load(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(value, dict)
    return value


# --------------------------------------------------------------------------------------------
# Drift


def test_committed_contracts_match_the_code(script: ModuleType) -> None:
    drifted = script.check(ROOT)
    assert drifted == [], f"contracts/ is out of date ({REGENERATE}): {drifted}"


def test_check_reports_differing_missing_and_extra_files(tmp_path: Path, openapi: dict[str, Any]) -> None:
    written = write_contracts(tmp_path, openapi)
    assert "contracts/asyncapi.json" in written
    assert check_contracts(tmp_path, openapi) == []
    assert write_contracts(tmp_path, openapi) == []  # writing again changes nothing

    asyncapi = tmp_path / "contracts" / "asyncapi.json"
    asyncapi.write_text(asyncapi.read_text(encoding="utf-8").replace("Fabrik events", "Fabrik"))
    (tmp_path / "contracts" / "events" / "run.queued.schema.json").unlink()
    (tmp_path / "contracts" / "events" / "run.renamed.schema.json").write_text("{}\n")
    (tmp_path / "contracts" / "README.md").write_text("not generated, not checked\n")

    assert check_contracts(tmp_path, openapi) == [
        "contracts/asyncapi.json (differs)",
        "contracts/events/run.queued.schema.json (missing)",
        "contracts/events/run.renamed.schema.json (extra)",
    ]
    assert write_contracts(tmp_path, openapi) == [
        "contracts/asyncapi.json",
        "contracts/events/run.queued.schema.json",
        "contracts/events/run.renamed.schema.json",
    ]
    assert check_contracts(tmp_path, openapi) == []
    assert not (tmp_path / "contracts" / "events" / "run.renamed.schema.json").exists()
    assert (tmp_path / "contracts" / "README.md").exists()


def test_cli_check_exits_1_and_lists_drifted_files(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "check", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "contracts/openapi.json (missing)" in result.stderr
    assert "contracts/asyncapi.json (missing)" in result.stderr


def test_cli_write_then_check(script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert script.main(["write", "--root", str(tmp_path)]) == 0
    assert script.main(["check", "--root", str(tmp_path)]) == 0
    (tmp_path / "contracts" / "openapi.json").write_text("{}\n")
    capsys.readouterr()
    assert script.main(["check", "--root", str(tmp_path)]) == 1
    assert "contracts/openapi.json (differs)" in capsys.readouterr().err


def test_output_is_deterministic(openapi: dict[str, Any], tmp_path: Path) -> None:
    write_contracts(tmp_path / "a", openapi)
    write_contracts(tmp_path / "b", openapi)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.json"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.json"))
    assert files_a == files_b
    for rel in files_a:
        text = (tmp_path / "a" / rel).read_text(encoding="utf-8")
        assert text == (tmp_path / "b" / rel).read_text(encoding="utf-8")
        assert text.endswith("}\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------
# Event schemas


def test_every_event_type_has_exactly_one_schema_file() -> None:
    tags = {cls.event_type() for cls in all_event_types()}
    files = {p.name.removesuffix(".schema.json") for p in (CONTRACTS / "events").glob("*.schema.json")}
    assert files == tags


@pytest.mark.parametrize("cls", all_event_types(), ids=lambda cls: cls.event_type())
def test_event_schema_file_is_self_contained_and_describes_the_event(cls: Any) -> None:
    tag = cls.event_type()
    schema = _load(CONTRACTS / "events" / f"{tag}.schema.json")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(f"/events/{tag}.schema.json")
    assert schema["title"] == cls.__name__
    assert schema["description"].strip()
    if cls.__doc__:
        assert " ".join(schema["description"].split()) == " ".join(cls.__doc__.split())
    assert schema["type"] == "object"
    assert schema["properties"]["type"] == {"enum": [tag]}
    assert {"type", "event_id", "occurred_at", "schema_version"} <= set(schema["properties"])
    assert "type" in schema["required"]
    for ref in iter_refs(schema):
        assert ref.startswith("#/$defs/"), f"{ref} leaves the file"
        resolve_ref(schema, ref)


def test_event_schemas_keyed_by_tag() -> None:
    schemas = event_schemas()
    assert list(schemas) == [cls.event_type() for cls in all_event_types()]
    ids = [s["$id"] for s in schemas.values()]
    assert len(set(ids)) == len(ids)


# --------------------------------------------------------------------------------------------
# AsyncAPI


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    return _load(CONTRACTS / "asyncapi.json")


def test_asyncapi_is_version_3_0_0_with_json_default(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["defaultContentType"] == "application/json"
    assert asyncapi["info"]["title"] == "Fabrik events"
    assert asyncapi["info"]["version"]


def test_asyncapi_references_all_resolve(asyncapi: dict[str, Any]) -> None:
    refs = list(iter_refs(asyncapi))
    assert refs
    for ref in refs:
        resolve_ref(asyncapi, ref)


def _channel_for(asyncapi: dict[str, Any], address: str) -> dict[str, Any]:
    found = [c for c in asyncapi["channels"].values() if c.get("address") == address]
    assert len(found) == 1, f"{len(found)} channels with address {address}"
    channel: dict[str, Any] = found[0]
    return channel


@pytest.mark.parametrize("cls", all_event_types(), ids=lambda cls: cls.event_type())
def test_asyncapi_has_a_channel_and_message_for_every_event(asyncapi: dict[str, Any], cls: Any) -> None:
    tag = cls.event_type()
    channel = _channel_for(asyncapi, cls.SUBJECT)
    assert set(channel.get("parameters", {})) == set(re.findall(r"{(\w+)}", cls.SUBJECT))
    refs = [m["$ref"] for m in channel["messages"].values()]
    assert len(refs) == 1
    message = resolve_ref(asyncapi, refs[0])
    assert message["name"] == tag
    payload = resolve_ref(asyncapi, message["payload"]["$ref"])
    assert payload["properties"]["type"] == {"enum": [tag]}
    header_schema = json.dumps(message["headers"])
    assert tag in header_schema
    headers = resolve_ref(asyncapi, "#/components/schemas/EventHeaders")
    assert {"Nats-Msg-Id", "Fabrik-Event-Type", "traceparent"} <= set(headers["required"])


def test_every_event_has_a_role_and_a_sender(asyncapi: dict[str, Any]) -> None:
    tags = [cls.event_type() for cls in all_event_types()]
    assert set(EVENT_ROLES) == set(tags)
    senders: dict[str, set[str]] = {tag: set() for tag in tags}
    receivers: dict[str, set[str]] = {tag: set() for tag in tags}
    for operation in asyncapi["operations"].values():
        for message_ref in operation["messages"]:
            # AsyncAPI 3: an operation's messages must be messages of its channel.
            assert message_ref["$ref"].startswith(operation["channel"]["$ref"] + "/messages/")
            in_channel = resolve_ref(asyncapi, message_ref["$ref"])
            tag = resolve_ref(asyncapi, in_channel["$ref"])["name"]
            if tag in senders:
                (senders if operation["action"] == "send" else receivers)[tag].add(
                    operation["x-fabrik-service"]
                )
    for tag in tags:
        assert senders[tag] == set(EVENT_ROLES[tag].senders), tag
        assert receivers[tag] == set(EVENT_ROLES[tag].receivers), tag
        assert senders[tag], f"nobody sends {tag}"
    assert {s for roles in EVENT_ROLES.values() for s in (*roles.senders, *roles.receivers)} <= set(SERVICES)


def test_asyncapi_documents_streams_and_dead_letters(asyncapi: dict[str, Any]) -> None:
    documented = {
        c["x-fabrik-stream"]["name"]: c
        for c in asyncapi["channels"].values()
        if isinstance(c.get("x-fabrik-stream"), dict)
    }
    assert set(documented) == {spec.name for spec in STREAMS}
    for spec in STREAMS:
        channel = documented[spec.name]
        assert channel["x-fabrik-stream"]["subjects"] == list(spec.subjects)
        if spec.codec is not None:
            tags = {resolve_ref(asyncapi, m["$ref"])["name"] for m in channel["messages"].values()}
            assert tags == {cls.event_type() for cls in spec.codec.members()}

    dead_letter = next(
        c for c in asyncapi["channels"].values() if (c.get("address") or "").startswith("fabrik.deadletter.")
    )
    example = dead_letter_subject("RUNS", "scheduler-runs")
    pattern = re.sub(r"{\w+}", "*", dead_letter["address"])
    assert subject_matches(pattern, example)
    assert "RUNS" in dead_letter["parameters"]["stream"]["enum"]
    message = resolve_ref(asyncapi, next(iter(dead_letter["messages"].values()))["$ref"])
    headers = resolve_ref(asyncapi, message["headers"]["$ref"])
    assert {
        "Nats-Msg-Id",
        "Fabrik-Dead-Letter-Reason",
        "Fabrik-Dead-Letter-Subject",
        "Fabrik-Dead-Letter-Stream",
        "Fabrik-Dead-Letter-Sequence",
        "Fabrik-Dead-Letter-Consumer",
        "Fabrik-Dead-Letter-Deliveries",
    } <= set(headers["required"])


# --------------------------------------------------------------------------------------------
# OpenAPI


def test_openapi_is_the_gateways_document(openapi: dict[str, Any]) -> None:
    committed = _load(CONTRACTS / "openapi.json")
    assert committed["openapi"].startswith("3.")
    assert committed == openapi, REGENERATE
    assert "paths" in committed
