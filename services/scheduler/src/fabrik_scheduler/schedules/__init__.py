"""Cron schedules: definitions, slot arithmetic, health, and the leader's firing engine."""
