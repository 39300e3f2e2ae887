"""Prefect flows: ``evolve`` (the CMA-ES loop) and ``generation`` (one generation on Ray)."""
