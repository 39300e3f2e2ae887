"""lm-eval task objects, built once per slot and reused for every candidate.

Building a TaskManager indexes task YAMLs (thousands with the built-in tasks) and loading a task
reads its dataset: seconds per candidate if done per evaluation. A slot builds them once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any


def load_task_objects(
    task_names: Sequence[str], search_paths: Sequence[str], include_defaults: bool
) -> tuple[Any, list[Any]]:
    """(TaskManager, the Task/Group objects to pass to ``simple_evaluate`` for these names)."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = TaskManager(include_path=list(search_paths) or None, include_defaults=include_defaults)
    loaded = manager.load(list(task_names))
    objects: list[Any] = []
    for name in task_names:
        obj = loaded["groups"].get(name) or loaded["tasks"].get(name)
        if obj is None:  # a tag: it stands for all of its tasks
            objects.extend(t for t in loaded["tasks"].values() if t not in objects)
        elif obj not in objects:
            objects.append(obj)
    return manager, objects
