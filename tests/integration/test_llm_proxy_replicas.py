"""Three llm-proxy processes against one NATS enforce one rate limit, not three."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nats

from fabrik_common.ids import new_ulid
from fabrik_common.runkeys import issue_run_key
from fabrik_common.testing import ServiceProcess

SECRET = "replica-test-secret-0123456789abcdef"


async def test_three_replicas_admit_exactly_the_project_limit(nats_url: str, tmp_path: Path) -> None:
    config = {"models": {"*": [{"provider": "echo"}]}, "limits": {"project": {"rpm": 60}}}
    (tmp_path / "llm.json").write_text(json.dumps(config))
    env = {
        "FABRIK_NATS_URL": nats_url,
        "FABRIK_LLM_CONFIG_FILE": str(tmp_path / "llm.json"),
        "FABRIK_RUN_KEY_SECRET": SECRET,
        "FABRIK_LOG_LEVEL": "WARNING",
    }
    replicas = [
        ServiceProcess(
            "fabrik_llm_proxy", {**env, "FABRIK_INSTANCE_ID": f"r{i}"}, log_path=tmp_path / f"proxy-{i}.log"
        )
        for i in range(3)
    ]
    try:
        for replica in replicas:
            replica.start_process()
        await asyncio.gather(*(asyncio.to_thread(r.wait_ready, 60) for r in replicas))

        # 120 calls at once from many runs of one project, spread over the three replicas.
        keys = [
            issue_run_key(
                SECRET.encode(),
                run_id=new_ulid(),
                project="shared",
                budget_usd=None,
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
            for _ in range(12)
        ]
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:

            async def call(i: int) -> tuple[int, str | None]:
                replica = replicas[i % 3]
                r = await client.post(
                    f"{replica.base_url}/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"call {i}"}]},
                    headers={"Authorization": f"Bearer {keys[i % len(keys)]}"},
                )
                return r.status_code, r.headers.get("retry-after")

            results = await asyncio.gather(*(call(i) for i in range(120)))
        statuses = Counter(status for status, _ in results)
        assert statuses == {200: 60, 429: 60}, statuses
        assert all(ra is not None and 1 <= int(ra) <= 60 for status, ra in results if status == 429)
        # The shared counter holds the limit, written by the replicas' compare-and-set updates.
        nc = await nats.connect(nats_url)
        try:
            entry = await (await nc.jetstream().key_value("limits")).get("rpm.project.shared")
            assert json.loads(entry.value)["value"] == 60
        finally:
            await nc.close()
    finally:
        for replica in replicas:
            replica.kill()
