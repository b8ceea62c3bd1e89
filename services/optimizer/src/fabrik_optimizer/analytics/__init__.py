"""The optimizer's analytics read model: a store built from run and LLM usage events, and queries on it."""
