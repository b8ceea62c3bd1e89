"""Fabrik backup: Snapshots of streams, KV buckets and object stores; verify, restore, migration import."""
