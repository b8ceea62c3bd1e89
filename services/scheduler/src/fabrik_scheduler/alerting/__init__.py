"""Alert delivery: `fabrik.alerts.>` events routed by rules to Slack, webhooks and e-mail.

`rules` (configuration and matching), `render` (what a message says), `channels` (how it is
sent), `engine` (episodes, de-duplication state in the `alerts` KV bucket, re-alerts, retries).
See docs/alerts.md.
"""
