"""The pool of evaluation slots on Ray: one long-lived SlotWorker actor per slot.

A slot is one GPU where the cluster has GPUs, otherwise one CPU. Placement is
expressed to Ray as resources, so Ray (not hope) keeps two candidates off one slot. A slot
request Ray can never satisfy fails after ``slot_start_timeout`` seconds with the cluster's
resources in the message.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.core.records import CandidateRequest, EvaluationOutcome, error_summary
from evomerge.core.run_spec import RunSpec


if TYPE_CHECKING:
    from evomerge.backends.slot_worker import MergedCandidate


class SlotStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class SlotRef:
    """How a Prefect task finds its slot's actor: a named actor in the run's namespace."""

    name: str
    actor_name: str
    namespace: str
    node: str = ""
    node_id: str = ""


def plan_slots(cluster_resources: dict[str, float], spec: RunSpec) -> tuple[int, dict]:
    """(number of slots, Ray options of one slot actor)."""
    gpus = int(cluster_resources.get("GPU", 0))
    if gpus > 0:
        # More slots than GPUs fails at placement, with the cluster's resources in the message.
        return spec.options.num_gpus or gpus, {"num_gpus": 1, "num_cpus": 1}
    if spec.options.num_gpus:
        raise SlotStartError(
            f"--num-gpus {spec.options.num_gpus} was given but the Ray cluster has no GPU; "
            "leave it out to use CPU slots (--cpu-slots)"
        )
    cpus = int(cluster_resources.get("CPU", 1))
    count = spec.options.cpu_slots or max(1, cpus)
    return count, {"num_cpus": 1}


class SlotPool:
    """The run's slot actors. Holding their handles keeps them alive: Ray collects a
    non-detached actor, named or not, once no handle to it is left."""

    def __init__(self, refs: list[SlotRef], handles: list):
        self.refs = refs
        self._handles = handles

    def stop(self) -> None:
        import ray

        for handle in self._handles:
            try:
                ray.kill(handle)
            except Exception:  # already gone
                pass
        self._handles = []


def start_slots(spec: RunSpec) -> SlotPool:
    import ray

    from evomerge.backends.slot_worker import SlotWorker

    count, actor_options = plan_slots(ray.cluster_resources(), spec)
    namespace = f"evomerge-{uuid.uuid4().hex[:8]}"
    actor_cls = ray.remote(SlotWorker)
    actors, refs = [], []
    for i in range(count):
        name = f"slot-{i}"
        actor_name = f"evomerge-{name}"
        actor = actor_cls.options(
            name=actor_name,
            namespace=namespace,
            max_concurrency=1,
            # A slot's worker process that dies (OOM killer, segfault, kill -9, a timeout's
            # restart) is started again by Ray; the candidate it held is retried by
            # run_on_slot, a bounded number of times.
            max_restarts=-1,
            **actor_options,
        ).remote(spec, name, threads=actor_options.get("num_cpus", 1))
        actors.append(actor)
        refs.append(SlotRef(name, actor_name, namespace))
    pool = SlotPool(refs, actors)
    # Prefect tasks run in Ray worker processes; a fresh worker spends seconds importing Prefect.
    # Warm one per slot while the actors start, so the first generation does not pay for it
    # (Ray reuses idle workers for later tasks of the run).
    warm = ray.remote(num_cpus=0)(_import_task_dependencies)
    warming = [warm.remote() for _ in range(count)]
    ready, not_ready = ray.wait(
        [a.describe.remote() for a in actors], num_returns=count, timeout=spec.options.slot_start_timeout
    )
    if not_ready:
        pool.stop()
        raise SlotStartError(
            f"Ray placed {len(ready)} of {count} evaluation slots ({actor_options} each) within "
            f"{spec.options.slot_start_timeout:.0f} s; the cluster has {ray.cluster_resources()}. "
            "Lower --num-gpus/--cpu-slots or add nodes"
        )
    try:
        described = ray.get(ready)  # raises if a slot failed to start (e.g. bad task files)
        ray.get(warming, timeout=spec.options.slot_start_timeout)
    except Exception:
        pool.stop()
        raise
    by_slot = {d["slot"]: d for d in described}
    pool.refs = [
        SlotRef(r.name, r.actor_name, r.namespace, by_slot[r.name]["node"], by_slot[r.name]["node_id"])
        for r in refs
    ]
    return pool


def _import_task_dependencies() -> int:
    import prefect  # noqa: F401
    import prefect_ray  # noqa: F401

    return os.getpid()


class SlotsOnDemand:
    """Starts Ray and the slot pool the first time a generation needs them, stops both at exit.

    A run started again on a finished or mostly replayed storage path then costs no cluster.
    """

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self._pool: SlotPool | None = None
        self._started_ray = False

    def refs(self) -> list[SlotRef]:
        if self._pool is None:
            from evomerge.backends.ray_cluster import connect_ray

            self._started_ray = connect_ray(self.spec.options.ray_address)
            self._pool = start_slots(self.spec)
            logging.getLogger("evomerge").info(
                "%d evaluation slots: %s", len(self._pool.refs),
                ", ".join(f"{r.name}@{r.node}" for r in self._pool.refs),
            )
        return self._pool.refs

    def __enter__(self) -> SlotsOnDemand:
        return self

    def __exit__(self, *exc_info) -> None:
        from evomerge.backends.ray_cluster import disconnect_ray

        if self._pool is not None:
            self._pool.stop()
        disconnect_ray(self._started_ray)


@dataclass(frozen=True)
class CandidatePolicy:
    """How long a candidate may run on a slot, and how often it is retried when the slot's
    worker dies under it."""

    timeout: float
    retries: int
    worker_start_timeout: float  # how long a restarting worker may take to come back

    @classmethod
    def from_options(cls, options) -> CandidatePolicy:
        return cls(options.candidate_timeout, options.worker_retries, options.slot_start_timeout)


def run_on_slot(
    slot: SlotRef, request: CandidateRequest, policy: CandidatePolicy, merged: MergedCandidate | None = None
) -> EvaluationOutcome:
    """Merge and score one candidate on the given slot's actor (blocks until done); with
    ``merged`` (serial and buffered strategies), score the folder a merge task made instead.

    Never raises for the candidate's sake: a worker that dies under it is replaced by Ray and
    the candidate retried up to ``policy.retries`` times; a candidate still running after
    ``policy.timeout`` seconds is failed and the worker restarted (the hung process is killed,
    the slot comes back). The timeout starts when the worker is ready, so a restart after
    another candidate's death is not charged to this one.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deaths: list[str] = []
    attempts = policy.retries + 1
    for attempt in range(1, attempts + 1):
        actor = ray.get_actor(slot.actor_name, namespace=slot.namespace)
        try:
            _wait_until_ready(actor, policy.worker_start_timeout)
            call = actor.run.remote(request) if merged is None else actor.evaluate_merged.remote(request, merged)
            outcome = ray.get(call, timeout=policy.timeout)
            return outcome.model_copy(update={"attempts": attempt, "worker_deaths": deaths})
        except GetTimeoutError:
            ray.kill(actor, no_restart=False)
            return EvaluationOutcome(
                status="failed", attempts=attempt, worker_deaths=deaths, slot=slot.name, node=slot.node,
                error=f"timed out after {policy.timeout:g} s (--candidate-timeout) on {slot.name}; "
                "its worker was killed and restarted",
            )
        except RayActorError as exc:
            deaths.append(error_summary(exc))
            logging.getLogger("evomerge").warning(
                "the worker of %s died under candidate %s.%s (attempt %d of %d): %s",
                slot.name, request.generation, request.index, attempt, attempts, deaths[-1],
            )
        except Exception as exc:  # SlotWorker.run catches a candidate's errors; this is Ray's or ours
            return EvaluationOutcome(status="failed", attempts=attempt, worker_deaths=deaths,
                                     slot=slot.name, node=slot.node, error=error_summary(exc))
    return EvaluationOutcome(
        status="failed", attempts=attempts, worker_deaths=deaths, slot=slot.name, node=slot.node,
        error=f"the worker of {slot.name} died {len(deaths)} times under this candidate "
        f"(--worker-retries {policy.retries}); last: {deaths[-1]}",
    )


def _wait_until_ready(actor, timeout: float) -> None:
    """Return once the actor answers; Ray reports a restarting actor as unavailable meanwhile."""
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError

    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.describe.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise GetTimeoutError(f"the slot's worker did not come back within {timeout:g} s") from None
            time.sleep(0.5)
