"""The Kubernetes client (kubernetes-asyncio), its configuration and small helpers around it.

kubernetes-asyncio's generated API is untyped; it is used through `Any` here so the rest of
the backend stays strictly typed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as _client
from kubernetes_asyncio import config as _config
from kubernetes_asyncio.client.exceptions import ApiException

k8s: Any = _client
k8s_config: Any = _config

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class ClientSettings:
    api_url: str = ""
    """A plain URL (no credentials): a `kubectl proxy`, or a test double."""
    mode: str = "auto"
    """auto | in-cluster | kubeconfig."""
    kubeconfig: str = ""
    context: str = ""


async def build_api_client(settings: ClientSettings) -> Any:
    configuration = k8s.Configuration()
    if settings.api_url:
        configuration.host = settings.api_url.rstrip("/")
    elif settings.mode == "in-cluster" or (
        settings.mode == "auto" and os.environ.get("KUBERNETES_SERVICE_HOST")
    ):
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        await k8s_config.load_kube_config(
            config_file=settings.kubeconfig or None,
            context=settings.context or None,
            client_configuration=configuration,
        )
    return k8s.ApiClient(configuration=configuration)


class Apis:
    """The API groups the backend uses, over one ApiClient."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client
        self.core: Any = k8s.CoreV1Api(api_client)
        self.batch: Any = k8s.BatchV1Api(api_client)

    async def close(self) -> None:
        await self.client.close()


def status_of(exc: BaseException) -> int:
    return int(getattr(exc, "status", 0) or 0)


def reason_of(exc: BaseException) -> str:
    """The `reason` of the Status object the API server answered with (AlreadyExists, Conflict, ...)."""
    body = getattr(exc, "body", None)
    if body:
        try:
            return str(json.loads(body).get("reason") or "")
        except (ValueError, AttributeError):
            return ""
    return ""


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and status_of(exc) == 404


def is_already_exists(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and status_of(exc) == 409 and reason_of(exc) != "Conflict"


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and status_of(exc) == 409 and reason_of(exc) == "Conflict"


def escape_pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


async def read_json(response: Any) -> Any:
    """The body of a `_preload_content=False` response, raising ApiException on an error status."""
    try:
        if response.status >= 400:
            text = await response.text()
            raise ApiException(status=response.status, reason=text[:500])
        return await response.json(content_type=None)
    finally:
        response.release()
