"""Experiments on run configuration: sequential statistics and decisions."""
