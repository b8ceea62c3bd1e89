"""Fabrik llm-proxy: Every LLM call a run makes: provider routing, keys, limits, budgets, usage accounting."""
