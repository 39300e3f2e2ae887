"""evomerge: evolutionary search of mergekit merge recipes, scored by lm-evaluation-harness.

Layers (dependencies point one way): ``evomerge.core`` (pure: numpy, pydantic, pycma) <-
``evomerge.backends`` (mergekit, lm-eval, fsspec, Ray, Prefect server) <- the search session and
loop <- ``evomerge.tasks`` <- ``evomerge.flows`` <- ``evomerge.cli``. ARCHITECTURE.md follows one
candidate through them.
"""

__version__ = "0.5.0"
