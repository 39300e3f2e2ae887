"""Side-effecting library code behind small interfaces: run store, model inspection, mergers,
evaluators, the slot pool on Ray, and the private Prefect server."""
