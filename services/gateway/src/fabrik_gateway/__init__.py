"""Fabrik gateway: The HTTP edge: REST API, live stream, dashboard, webhooks, API tokens."""
