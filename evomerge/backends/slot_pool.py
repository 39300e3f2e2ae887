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
from collections.abc import Iterator
from contextlib import contextmanager
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
    """The run's evaluation slots: Ray (a private local cluster, or ``--ray-address``) and one
    SlotWorker actor per slot.

    ``launch`` starts Ray and creates the actors without waiting for them; ``refs`` waits until
    every slot has started (raising after ``--slot-start-timeout``). Holding the actors' handles
    keeps them alive: Ray collects a non-detached actor once no handle to it is left. ``stop``
    kills the actors and stops the cluster if this pool started it.
    """

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self._started_ray = False
        self._actors: list = []
        self._race_board = None  # --racing: the board actor every slot publishes to
        self._pending: list[SlotRef] = []
        self._warming: list = []
        self._actor_options: dict = {}
        self._refs: list[SlotRef] | None = None

    @property
    def launched(self) -> bool:
        return bool(self._actors)

    def launch(self) -> SlotPool:
        if self.launched:
            return self
        import ray

        from evomerge.backends.ray_cluster import connect_ray
        from evomerge.backends.slot_worker import SlotWorker

        self._started_ray = connect_ray(self.spec.options.ray_address)
        count, self._actor_options = plan_slots(ray.cluster_resources(), self.spec)
        namespace = f"evomerge-{uuid.uuid4().hex[:8]}"
        actor_cls = ray.remote(SlotWorker)
        race_board = None
        if self.spec.options.racing:  # one board for every slot: kept alive by this pool's handle
            from evomerge.backends.race_board import RaceBoard

            race_board = self._race_board = ray.remote(RaceBoard).options(num_cpus=0, namespace=namespace).remote()
        for i in range(count):
            name = f"slot-{i}"
            actor_name = f"evomerge-{name}"
            self._actors.append(
                actor_cls.options(
                    name=actor_name,
                    namespace=namespace,
                    max_concurrency=1,
                    # A slot's worker process that dies (OOM killer, segfault, kill -9, a timeout's
                    # restart) is started again by Ray; the candidate it held is retried by
                    # run_on_slot, a bounded number of times.
                    max_restarts=-1,
                    **self._actor_options,
                ).remote(self.spec, name, threads=self._actor_options.get("num_cpus", 1), race_board=race_board)
            )
            self._pending.append(SlotRef(name, actor_name, namespace))
        # Prefect tasks run in Ray worker processes; a fresh worker spends seconds importing
        # Prefect. Warm one per slot while the actors start, so the first candidates do not pay
        # for it (Ray reuses idle workers for later tasks of the run).
        warm = ray.remote(num_cpus=0)(_import_task_dependencies)
        self._warming = [warm.remote() for _ in range(count)]
        return self

    def refs(self) -> list[SlotRef]:
        """The slots, once every one has started (launching them first if needed)."""
        if self._refs is not None:
            return self._refs
        import ray

        self.launch()
        timeout = self.spec.options.slot_start_timeout
        count = len(self._actors)
        ready, not_ready = ray.wait([a.describe.remote() for a in self._actors], num_returns=count, timeout=timeout)
        if not_ready:
            raise SlotStartError(
                f"Ray placed {len(ready)} of {count} evaluation slots ({self._actor_options} each) within "
                f"{timeout:.0f} s; the cluster has {ray.cluster_resources()}. Lower --num-gpus/--cpu-slots "
                "or add nodes"
            )
        described = {d["slot"]: d for d in ray.get(ready)}  # raises if a slot failed to start
        ray.get(self._warming, timeout=timeout)
        self._refs = [
            SlotRef(r.name, r.actor_name, r.namespace, described[r.name]["node"], described[r.name]["node_id"])
            for r in self._pending
        ]
        logging.getLogger("evomerge").info(
            "%d evaluation slots: %s", count, ", ".join(f"{r.name}@{r.node}" for r in self._refs)
        )
        return self._refs

    def stop(self) -> None:
        from evomerge.backends.ray_cluster import disconnect_ray

        if self._actors:
            import ray

            # Each slot shuts down what it started (a resident vLLM engine, the one thing that
            # holds anything beyond its process) before it is killed; a slot still busy or hung
            # is killed anyway after a short wait. Slots without one are not waited for.
            holds_engine = self.spec.options.vllm and self.spec.options.in_memory
            closing = [actor.close.remote() for actor in self._actors] if holds_engine else []
            closed, _ = ray.wait(closing, num_returns=len(closing), timeout=15) if closing else ([], [])
            for ref in closed:
                try:
                    if said := ray.get(ref):
                        logging.getLogger("evomerge").info("%s", said)
                except Exception:  # a slot that died at the end: nothing of it is left to close
                    pass
            for actor in [*self._actors, *([self._race_board] if self._race_board is not None else [])]:
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
        self._actors, self._refs, self._race_board = [], None, None
        disconnect_ray(self._started_ray)
        self._started_ray = False


def _import_task_dependencies() -> int:
    import prefect  # noqa: F401
    import prefect_ray  # noqa: F401

    return os.getpid()


# Pools launched before their run's flow started (the CLI launches Ray and the slots while the
# private Prefect server boots), by storage path; the flow takes its pool from here.
_LAUNCHED_EARLY: dict[str, SlotPool] = {}


def launch_early(spec: RunSpec) -> SlotPool:
    """Launch the slots of the run on ``spec.storage_path`` now; its flow will use them."""
    pool = _LAUNCHED_EARLY[spec.storage_path] = SlotPool(spec).launch()
    return pool


@contextmanager
def slot_pool(spec: RunSpec) -> Iterator[SlotPool]:
    """The run's slot pool (launched early, or on first use), stopped when the block ends. A run
    started again on a finished storage path thus costs no cluster unless it was launched early."""
    pool = _LAUNCHED_EARLY.pop(spec.storage_path, None) or SlotPool(spec)
    try:
        yield pool
    finally:
        pool.stop()


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
    and the slot is handed back only once its new worker answers, so the next candidate does
    not find it restarting). The timeout starts when the worker is ready: a ``describe`` call
    is queued right before the candidate (an actor runs one caller's calls in order) and its
    answer starts the clock, without a round trip of its own.

    A worker that dies while this candidate's calls are in flight counts as a death under this
    candidate, even when it is the ``describe`` that sees it: a candidate that kills its worker
    at once can take the ``describe``'s answer down with it, and calling that "not ready yet"
    would retry such a candidate without end.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    def submit(actor):
        return actor.run.remote(request) if merged is None else actor.evaluate_merged.remote(request, merged)

    deaths: list[str] = []
    attempts = policy.retries + 1

    def failed(attempt: int, error: str) -> EvaluationOutcome:
        return EvaluationOutcome(
            status="failed", attempts=attempt, worker_deaths=deaths, slot=slot.name, node=slot.node, error=error
        )

    for attempt in range(1, attempts + 1):
        actor = _slot_actor(slot)
        call = None
        try:
            if deaths:  # the worker that died under the last attempt is being restarted
                _wait_until_ready(actor, policy.worker_start_timeout)
            call = _submit_when_ready(actor, submit, policy.worker_start_timeout)
            outcome = ray.get(call, timeout=policy.timeout)
            return outcome.model_copy(update={"attempts": attempt, "worker_deaths": deaths})
        except GetTimeoutError:
            ray.kill(actor, no_restart=False)
            error = f"timed out after {policy.timeout:g} s (--candidate-timeout) on {slot.name}; "
            try:
                _wait_until_ready(actor, policy.worker_start_timeout)
                return failed(attempt, error + "its worker was killed and restarted")
            except Exception as exc:
                return failed(attempt, error + f"its worker was killed and did not come back: {error_summary(exc)}")
        except RayActorError as exc:  # its worker died under the candidate
            if call is not None:  # never run one candidate twice on a slot
                _cancel_quietly(call)
            deaths.append(error_summary(exc))
            logging.getLogger("evomerge").warning(
                "the worker of %s died under candidate %s.%s (attempt %d of %d): %s",
                slot.name,
                request.generation,
                request.index,
                attempt,
                attempts,
                deaths[-1],
            )
        except Exception as exc:  # SlotWorker.run catches a candidate's errors; this is Ray's or ours
            return failed(attempt, error_summary(exc))
    return failed(
        attempts,
        f"the worker of {slot.name} died {len(deaths)} times under this candidate "
        f"(--worker-retries {policy.retries}); last: {deaths[-1]}",
    )


# Handles of the slot actors this process has looked up: a handle stays valid across the actor's
# restarts, so the lookup (a GCS round trip) is made once per process, not once per candidate.
_ACTORS: dict[tuple[str, str], object] = {}


def _slot_actor(slot: SlotRef):
    import ray

    key = (slot.namespace, slot.actor_name)
    if key not in _ACTORS:
        _ACTORS[key] = ray.get_actor(slot.actor_name, namespace=slot.namespace)
    return _ACTORS[key]


def _submit_when_ready(actor, submit, timeout: float):
    """``submit(actor)`` once the actor answers. A ``describe`` call goes right before the
    candidate's (an actor runs one caller's calls in order), so no round trip is spent waiting
    for it. A worker that dies meanwhile raises Ray's ``RayActorError`` (``ActorDiedError`` or
    ``ActorUnavailableError``): the caller counts it as a death under this candidate."""
    import ray

    ready = actor.describe.remote()
    call = submit(actor)
    from ray.exceptions import GetTimeoutError

    try:
        ray.get(ready, timeout=timeout)
    except BaseException as exc:
        _cancel_quietly(call)
        if isinstance(exc, GetTimeoutError):
            raise SlotNotReady(timeout) from None
        raise
    return call


def _cancel_quietly(call) -> None:
    import ray

    try:
        ray.cancel(call)
    except Exception:  # nothing to cancel: it died with its worker
        pass


class SlotNotReady(RuntimeError):
    """A slot's worker did not answer within ``--slot-start-timeout`` (a candidate never ran)."""

    def __init__(self, timeout: float):
        super().__init__(f"the slot's worker did not answer within {timeout:g} s (--slot-start-timeout)")


def _wait_until_ready(actor, timeout: float) -> None:
    """Return once the actor answers. Calls sent to a worker that is being restarted fail
    (``ActorUnavailableError``, or ``ActorDiedError`` for one in flight when it died): ask again."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.describe.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except (RayActorError, GetTimeoutError):
            if time.monotonic() > deadline:
                raise SlotNotReady(timeout) from None
            time.sleep(0.5)
