"""Schedules: the definitions the gateway writes and the scheduler fires by, their slots in time and
their keys in the `schedules` KV bucket."""
