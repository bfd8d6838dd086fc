"""Inductor post-grad fusion passes, one module per fusion, named like vLLM's."""
