"""Fabrik scheduler: The run state machine, queues, quotas, fair share, schedules and run health."""
