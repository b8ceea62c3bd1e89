"""The end-to-end suite runs against a real Kubernetes cluster (k3d, k3s, kind, ...) and only
when `KUBECONFIG` names one; otherwise every test here is skipped. See docs/kubernetes.md
("The end-to-end suite") and `task e2e`."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("KUBECONFIG"):
        return
    skip = pytest.mark.skip(reason="KUBECONFIG is not set: the end-to-end suite needs a real cluster")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
