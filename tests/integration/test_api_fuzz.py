"""The whole API fuzzed from its committed OpenAPI document with schemathesis, against a real
gateway process over a real NATS server: no request may cause a 5xx, and every answer must match
the document (status code, content type, headers, body schema).

The gateway runs as a process (schemathesis calls are synchronous) with an HS256 secret and an
environment key; every case is sent as an admin, so that the fuzzing reaches past the guard into
each handler. The optimizer runs as a process too, so that costs, budgets and analytics are
answered (without it they are a documented 503, which `not_a_server_error` would count). Streaming
operations are excluded: a followed log or a live stream does not end."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fabrik_common.testing import NatsServer, ServiceProcess
from fabrik_gateway.auth.jwt import mint_hs256

ROOT = Path(__file__).resolve().parents[2]
SECRET = "fuzzing-secret-of-at-least-32-bytes!!"
ENV_KEY = "JCmzPt8s6HzH6W92h7boi4BiICpj42hwIxaqVW52nIA="
EXAMPLES = int(os.environ.get("FABRIK_FUZZ_EXAMPLES", "25"))

schema = schemathesis.openapi.from_path(ROOT / "contracts" / "openapi.json").exclude(path_regex=r"/stream$")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz")
    server = NatsServer(root / "nats")
    server.start()
    optimizer = ServiceProcess(
        "fabrik_optimizer",
        {
            "FABRIK_NATS_URL": server.url,
            "FABRIK_LOG_FORMAT": "text",
            "FABRIK_ANALYTICS_DB": str(root / "analytics.db"),
        },
        log_path=root / "optimizer.log",
    )
    backup = ServiceProcess(
        "fabrik_backup",
        {
            "FABRIK_NATS_URL": server.url,
            "FABRIK_LOG_FORMAT": "text",
            "FABRIK_DATA_DIR": str(root / "backup-data"),
            "FABRIK_BACKUP_TARGET": f"dir://{root / 'backups'}",
        },
        log_path=root / "backup.log",
    )
    process = ServiceProcess(
        "fabrik_gateway",
        {
            "FABRIK_NATS_URL": server.url,
            "FABRIK_LOG_FORMAT": "text",
            "FABRIK_ANONYMOUS_ROLE": "none",
            "FABRIK_JWT_HS256_SECRET": SECRET,
            "FABRIK_ENV_ENCRYPTION_KEY": ENV_KEY,
            "FABRIK_RATE_LIMIT_PER_MINUTE": "1000000",
            "FABRIK_RATE_LIMIT_BURST": "1000000",
            "FABRIK_LOGS_HEARTBEAT_SECONDS": "0.5",
        },
        log_path=root / "gateway.log",
    )
    try:
        optimizer.start_process()
        backup.start_process()
        process.start(ready_timeout=60)
        optimizer.wait_ready(60)
        backup.wait_ready(60)
        token = mint_hs256(SECRET, "fuzzer", "admin", ttl_seconds=3600)
        yield {"base_url": process.base_url, "headers": {"Authorization": f"Bearer {token}"}}
    finally:
        process.terminate()
        optimizer.kill()
        backup.kill()
        server.stop()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_api_conforms_to_its_document(case: Any, gateway: dict[str, Any]) -> None:
    if case.query and str(case.query.get("follow", "")).lower() == "true":
        case.query["follow"] = "false"
    case.call_and_validate(
        base_url=gateway["base_url"],
        headers=gateway["headers"],
        timeout=20,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )
