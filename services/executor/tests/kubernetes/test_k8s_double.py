"""Regressions of the Kubernetes API double (fabrik_common.testing.k8s_double), through the real client."""

from __future__ import annotations

from typing import Any

from fabrik_common.testing.k8s_double import KubeDouble
from fabrik_executor.kubernetes.api import ClientSettings, build_api_client, k8s


async def test_version_is_a_complete_version_info() -> None:
    async with KubeDouble() as api:
        client: Any = await build_api_client(ClientSettings(api_url=api.url))
        try:
            info = await k8s.VersionApi(client).get_code()
        finally:
            await client.close()
    assert (info.major, info.minor) == ("1", "30")
    assert info.git_version.startswith("v1.30.")
    for value in (info.git_commit, info.git_tree_state, info.build_date, info.go_version, info.compiler):
        assert value
    assert info.platform == "linux/amd64"


async def test_namespaces_created_at_start_are_stored_like_any_object() -> None:
    async with KubeDouble() as api:
        created = api.get("namespaces", "", "fabrik-runs")
        assert created is not None
        meta = created["metadata"]
        assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
        assert created["status"] == {"phase": "Active"}
        # replacing it (test setup) keeps its identity: this raised KeyError 'uid'
        replaced = api.put_object(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": "fabrik-runs",
                    "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
                },
            }
        )
        assert replaced["metadata"]["uid"] == meta["uid"]
        assert replaced["metadata"]["creationTimestamp"] == meta["creationTimestamp"]
        assert int(replaced["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
        client: Any = await build_api_client(ClientSettings(api_url=api.url))
        try:
            ns = await k8s.CoreV1Api(client).read_namespace("fabrik-runs")
        finally:
            await client.close()
    assert ns.metadata.uid == meta["uid"]
    assert ns.metadata.labels == {"pod-security.kubernetes.io/enforce": "restricted"}
    assert ns.metadata.creation_timestamp is not None
