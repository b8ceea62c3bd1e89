"""Slack integration of the gateway (docs/slack.md).

- `signature.py`: verification of Slack's request signatures (v0 scheme, 5-minute window);
- `config.py`: the Slack settings parsed and validated (`check_slack_settings` for start-up);
- `commands.py`: the `/fabrik` slash command: parsing, who may do what, doing it, answering (a
  run's spec and options are `fabrik_gateway.chatops`'s, shared with GitHub);
- `client.py`: the Slack Web API calls and `response_url` answers, with retryable/permanent errors;
- `notifier.py`: run state changes -> a thread per run in the project's channel (no NATS inside);
- `integration.py`: the per-gateway state (settings, HTTP client, thread store, metrics);
- `handlers.py`: the durable subscribers (`router`): slash commands from INGEST, notifications
  from RUNS.

This module imports nothing itself, so that `settings.py` can import `slack.config` without a cycle.
"""
