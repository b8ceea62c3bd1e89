"""The gateway's GitHub integration (docs/github.md).

- `config.py`: what the `FABRIK_GITHUB_*` settings mean (repository -> project map, secrets,
  credentials), validated at start;
- `webhook.py`: signature verification of `/webhooks/github` deliveries and the parsing of the
  payloads that can start a run (plain functions);
- `commands.py`: `/fabrik run [spec] [--key value]` comments, and the submit body they ask for (the
  spec and the options are `fabrik_gateway.chatops`'s, shared with Slack);
- `client.py`: the GitHub REST client (GitHub App installation tokens or a plain token);
- `reporter.py`: run events -> check run (or commit status) and outcome comment, kept in the
  `integrations` KV bucket;
- `integration.py`: `GithubIntegration`, the object that ties them to the gateway;
- `handlers.py`: the durable subscribers (`INGEST` deliveries, `RUNS` events).

This module imports nothing, so that `fabrik_gateway.settings` can import `config` without cycles.
"""
