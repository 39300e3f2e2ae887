"""The racing board of a run (``--racing``): each candidate's per-item scores as far as it has
been scored, by generation, which the slots compare running candidates with.

Slots publish after every stage, so the board holds the recorded candidates and those still
running. It lives in the driver's cluster, not in the storage path: a slot never needs the
storage's credentials. With Ray it is one actor of the run (``SlotPool``), whose handle every
slot gets; without Ray (a slot called in-process) a plain object. It is not kept across runs: a
resumed search's open generation is compared with the candidates scored since.
"""

from __future__ import annotations

from typing import Any

from evomerge.core.racing import ItemScores


class RaceBoard:
    def __init__(self) -> None:
        self._entries: dict[int, dict[str, ItemScores]] = {}

    def publish(self, generation: int, key: str, items: ItemScores) -> None:
        self._entries.setdefault(generation, {})[key] = items

    def others(self, generation: int, key: str) -> dict[str, ItemScores]:
        """The generation's candidates but ``key``."""
        return {k: v for k, v in self._entries.get(generation, {}).items() if k != key}


class RayRaceBoard:
    """A slot's view of the run's board actor (``ray.remote(RaceBoard)``)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def publish(self, generation: int, key: str, items: ItemScores) -> None:
        import ray

        ray.get(self.actor.publish.remote(generation, key, items))

    def others(self, generation: int, key: str) -> dict[str, ItemScores]:
        import ray

        return ray.get(self.actor.others.remote(generation, key))
