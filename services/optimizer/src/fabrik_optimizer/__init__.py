"""Fabrik optimizer: Analytics, cost accounting, budgets and configuration experiments."""
