"""evomerge: evolutionary search of mergekit merge recipes, scored by lm-evaluation-harness.

Layers (dependencies point one way): ``evomerge.core`` (pure: numpy + pydantic) <-
``evomerge.backends`` (mergekit, lm-eval, fsspec, Ray, Prefect server) <- ``tasks`` <- ``flows`` <-
``evomerge.cli``.
"""

__version__ = "0.1.0"
