"""Fabrik executor: Turns dispatched runs into workloads (local processes or Kubernetes Jobs)
and watches them."""
