"""Draining nodes before their servers go, through the Kubernetes API (kubernetes-asyncio).

As `kubectl drain` does: cordon the node (`spec.unschedulable`), evict every pod on it through the
Eviction API (so PodDisruptionBudgets are honoured; a 429 from a budget is retried until the
deadline) except DaemonSet pods and static (mirror) pods, wait until the evicted pods are gone
(deleted, not merely stopped),
then delete the Node object (k3s then drops the node's etcd member when it was a server).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


class DrainError(Exception):
    pass


def _skipped(pod: Any) -> bool:
    meta = pod.metadata
    if MIRROR_ANNOTATION in (meta.annotations or {}):
        return True
    return any(ref.kind == "DaemonSet" for ref in meta.owner_references or [])


async def drain(
    kubeconfig: str,
    nodes: Sequence[str],
    *,
    timeout: float = 300.0,  # noqa: ASYNC109 - a deadline for the whole drain, not one call
    poll: float = 2.0,
    echo: Callable[[str], None] = lambda _: None,
) -> None:
    from kubernetes_asyncio import client, config  # imported when a drain happens
    from kubernetes_asyncio.client.exceptions import ApiException

    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    async with client.ApiClient(configuration=configuration) as api:
        core = client.CoreV1Api(api)
        deadline = time.monotonic() + timeout
        for node in nodes:
            try:
                await core.patch_node(node, {"spec": {"unschedulable": True}})
            except ApiException as exc:
                if exc.status == 404:
                    echo(f"  node {node} is not in the cluster: nothing to drain")
                    continue
                raise DrainError(f"cannot cordon {node}: {exc.status} {exc.reason}") from exc
            echo(f"  cordoned {node}")
            while True:
                pods = await core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}")
                left = [p for p in pods.items if not _skipped(p)]
                if not left:
                    break
                if time.monotonic() > deadline:
                    names = ", ".join(f"{p.metadata.namespace}/{p.metadata.name}" for p in left)
                    raise DrainError(f"{node} still runs {names} after {timeout:g}s; nothing was removed")
                for pod in left:
                    if getattr(pod.metadata, "deletion_timestamp", None):
                        continue  # already going
                    body = client.V1Eviction(
                        metadata=client.V1ObjectMeta(name=pod.metadata.name, namespace=pod.metadata.namespace)
                    )
                    try:
                        await core.create_namespaced_pod_eviction(
                            pod.metadata.name, pod.metadata.namespace, body
                        )
                    except ApiException as exc:
                        if exc.status not in (404, 429):  # gone already / blocked by a budget for now
                            raise DrainError(
                                f"cannot evict {pod.metadata.namespace}/{pod.metadata.name}: "
                                f"{exc.status} {exc.reason}"
                            ) from exc
                await asyncio.sleep(poll)
            echo(f"  drained {node}")
        for node in nodes:
            try:
                await core.delete_node(node)
            except ApiException as exc:
                if exc.status != 404:
                    raise DrainError(f"cannot delete node {node}: {exc.status} {exc.reason}") from exc


def drainer(
    kubeconfig: str, *, timeout: float = 300.0, echo: Callable[[str], None] = lambda _: None
) -> Callable[[Sequence[str]], None]:
    """A synchronous drain function for `Cluster.apply`."""

    def run(nodes: Sequence[str]) -> None:
        try:
            asyncio.run(drain(kubeconfig, nodes, timeout=timeout, echo=echo))
        except DrainError:
            raise
        except Exception as exc:
            raise DrainError(f"cannot drain through {kubeconfig}: {exc}") from exc

    return run
