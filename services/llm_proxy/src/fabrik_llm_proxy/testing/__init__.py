"""Test helpers of the llm-proxy: fake upstream providers."""
