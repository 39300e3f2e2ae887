"""SearchSession: the state of one search on one storage path, between the flow and the store.

The evolve flow owns the loop; this object holds what the loop needs (the optimizer, the records,
the budget) and writes the outputs. It keeps nothing the store cannot rebuild: started again on
the same storage path with the same settings, it rebuilds CMA-ES from the generation checkpoints
(replayed through the seeded optimizer and checked against them bit for bit; no pickle), replays
any generation whose records outlived its checkpoint, and continues where the store ends.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import yaml

from evomerge.backends.run_store import RunStore
from evomerge.core.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CorruptStateError,
    GenerationCheckpoint,
    checkpoint_name,
    parse_checkpoint,
)
from evomerge.core.fitness import MissingMetricError, NonFiniteMetricError, too_many_failures, weighted_score
from evomerge.core.optimizer import CmaOptimizer
from evomerge.core.records import CandidateRecord, CandidateRequest, EvaluationOutcome
from evomerge.core.references import baseline_requests, held_out_requests, top_candidates
from evomerge.core.run_report import ComparisonRow, comparison_for, comparison_summary
from evomerge.core.run_spec import RunSpec
from evomerge.core.search_loop import GenerationPlan, best_record, plan_generation
from evomerge.failpoints import failpoint

log = logging.getLogger("evomerge")

# CMA-ES can settle where every vector it asks decodes to a merge already evaluated (e.g. slerp
# t values past the clipping bounds): such generations spend no budget, so without this limit the
# loop would run (and write checkpoints) until pycma's step size turns into NaN.
IDLE_GENERATIONS_LIMIT = 10


class RunStoppedError(RuntimeError):
    """The run cannot go on (a configuration error shown by the first evaluation, or a
    generation in which most candidates failed)."""


class StorageMismatchError(RuntimeError):
    pass


class SearchSession:
    # Sessions of this process by id. The generation subflow runs in the evolve flow's process
    # and finds its session here: passed as a flow parameter, the session (records, optimizer,
    # storage client) would be serialized into every task's context by Prefect.
    _active: dict[str, SearchSession] = {}

    def __init__(self, spec: RunSpec, store: RunStore | None = None):
        self.id = uuid.uuid4().hex
        SearchSession._active[self.id] = self
        self.spec = spec
        self.store = store or RunStore(spec.storage_path)
        self.space = spec.search_space()
        self.settings = spec.evaluation
        self._check_or_write_manifest()
        rng = np.random.default_rng(spec.options.seed)
        x0 = self.space.initial_point(rng if spec.config.random_init else None)
        self.optimizer = CmaOptimizer(x0, spec.options.sigma0, spec.options.seed, spec.options.popsize)
        # What resume had to work around (unreadable files), for the flow to show.
        self.restore_notes: list[str] = []
        self.records: dict[str, CandidateRecord] = self.store.read_records(on_unreadable=self.restore_notes.append)
        # Not CMA-ES candidates: parents and the uniform merge, and held-out scores.
        self.baselines = self.store.read_records(self.restore_notes.append, folder="baselines")
        self.held_out = self.store.read_records(self.restore_notes.append, folder="held_out")
        self.started = time.monotonic()
        self.finished_reason: str | None = None
        self.generations_this_run = 0  # generations that evaluated something in this run
        self.evaluated_this_run = 0
        self.paused = False  # stopped by --generations-per-run: the search itself goes on later
        self._best = best_record(self.records)
        self._pending: GenerationPlan | None = None
        self.idle_generations = 0  # consecutive generations that asked nothing new
        self.generations_done = self._restore_checkpoints()
        self._replay_recorded_generations()

    def _restore_checkpoints(self) -> int:
        """Tell the optimizer every checkpointed generation again; returns how many.

        Stops at the first missing or unreadable checkpoint: the generations after it are
        replayed from their records (and their checkpoints written again).
        """
        fingerprint = self.spec.fingerprint()
        generation = 0
        while (text := self.store.read_text(checkpoint_name(generation))) is not None:
            where = self.store.path(checkpoint_name(generation))
            try:
                checkpoint = parse_checkpoint(text, where, fingerprint, generation)
            except CorruptStateError as exc:
                self.restore_notes.append(
                    f"{exc}; resuming from the last good checkpoint "
                    f"({'none' if generation == 0 else f'generation {generation - 1}'}) "
                    "and the records written after it"
                )
                break
            vectors = self.optimizer.ask()
            if not np.array_equal(vectors, np.asarray(checkpoint.vectors)):
                raise CorruptStateError(
                    f"{where}: CMA-ES with this seed asks other vectors than the checkpoint "
                    "recorded, so the files were written by another pycma or evomerge version. "
                    "Continue with the version that wrote them, or use a new --storage-path"
                )
            self.optimizer.tell(vectors, checkpoint.scores_told)
            self._count_idle(generation, checkpoint.keys)
            if self.optimizer.sigma != checkpoint.sigma_after or not np.array_equal(
                self.optimizer.mean, np.asarray(checkpoint.mean_after)
            ):
                raise CorruptStateError(
                    f"{where}: replaying it does not reproduce the recorded CMA-ES state "
                    "(another pycma or numpy version?). Continue with the versions that wrote "
                    "it, or use a new --storage-path"
                )
            generation += 1
        return generation

    def _replay_recorded_generations(self) -> None:
        """Tell the generations after the last checkpoint whose candidates all have records (a
        kill between a generation's last record and its checkpoint, or a damaged checkpoint),
        writing their checkpoints again; the first generation that needs evaluating waits as
        the next one."""
        while self.idle_generations < IDLE_GENERATIONS_LIMIT:  # a converged search asks no more
            plan = self._plan(self.optimizer.ask())
            if plan.to_evaluate or not plan.complete:
                self._pending = plan
                return
            self.finish_generation(plan)

    @classmethod
    def active(cls, session_id: str) -> SearchSession:
        return cls._active[session_id]

    def close(self) -> None:
        SearchSession._active.pop(self.id, None)

    @property
    def elapsed_seconds(self) -> float:
        return time.monotonic() - self.started

    # --- budget ----------------------------------------------------------------------------
    @property
    def evaluations(self) -> int:
        return len(self.records)

    @property
    def budget_left(self) -> int:
        return max(0, self.spec.options.max_fevals - self.evaluations)

    def _count_idle(self, generation: int, keys) -> None:
        """A generation is idle when none of its merges was first evaluated in it (derived from
        the records, so a resumed run counts the same)."""
        fresh = any((r := self.records.get(k)) is not None and r.generation == generation for k in keys)
        self.idle_generations = 0 if fresh else self.idle_generations + 1

    @property
    def search_finished(self) -> bool:
        """The search itself is over (budget spent, or converged), not just this run."""
        return self.budget_left == 0 or self.idle_generations >= IDLE_GENERATIONS_LIMIT

    def should_stop(self) -> str | None:
        if self.finished_reason:
            return self.finished_reason
        if self.idle_generations >= IDLE_GENERATIONS_LIMIT:
            return (
                f"search converged: the last {self.idle_generations} generations asked only merges "
                f"already evaluated ({self.budget_left} of the budget left unspent)"
            )
        if self.budget_left == 0:
            return f"evaluation budget spent ({self.evaluations} of {self.spec.options.max_fevals})"
        timeout = self.spec.options.timeout
        if timeout is not None and time.monotonic() - self.started > timeout:
            return f"time budget of this run spent ({timeout:.0f} s)"
        per_run = self.spec.options.generations_per_run
        if per_run is not None and self.generations_this_run >= per_run:
            self.paused = True
            return f"generation budget of this run spent ({per_run}); run again to continue"
        return None

    # --- one generation --------------------------------------------------------------------
    def next_generation(self) -> GenerationPlan:
        if self._pending is not None:
            plan, self._pending = self._pending, None
            return plan
        return self._plan(self.optimizer.ask())

    def _plan(self, vectors: np.ndarray) -> GenerationPlan:
        if not np.all(np.isfinite(vectors)):
            raise RunStoppedError(
                f"CMA-ES asked a vector with NaN or infinity in generation {self.optimizer.generation} "
                "(its state degenerated); the records and the best config so far are kept"
            )
        return plan_generation(
            self.space, self.settings, self.optimizer.generation, vectors,
            frozenset(self.records), self.budget_left,
        )

    # --- baselines and held-out scores -------------------------------------------------------
    def baseline_requests(self) -> list[CandidateRequest]:
        """Parents and the uniform merge not scored yet (on the search's and held-out tasks)."""
        if not self.spec.options.baselines:
            return []
        return baseline_requests(self.space, self.settings, self.spec.held_out_evaluation,
                                 {**self.baselines, **self.held_out})

    def held_out_requests(self) -> list[CandidateRequest]:
        """The best candidates not yet scored on the held-out tasks (none without such tasks)."""
        held_out = self.spec.held_out_evaluation
        if held_out is None:
            return []
        return held_out_requests(top_candidates(self.records, self.spec.options.held_out_top),
                                 held_out, self.held_out)

    def comparison(self) -> list[ComparisonRow]:
        return comparison_for(self.records, self.baselines, self.held_out, self.spec.config,
                              self.spec.options.held_out_top)

    def record_outcome(
        self, request: CandidateRequest, outcome: EvaluationOutcome, round_trip: float = 0.0
    ) -> CandidateRecord:
        """Store a result at once (a crash later loses nothing of it)."""
        if outcome.fatal:
            raise RunStoppedError(f"stopping at the first evaluation: {outcome.error}")
        tasks = self.spec.evaluation_for(request.held_out).tasks
        score, status, error = None, outcome.status, outcome.error
        if status == "ok":
            try:
                score = weighted_score(outcome.metrics, tasks)
            except MissingMetricError as exc:
                raise RunStoppedError(f"stopping at the first evaluation: {exc}") from exc
            except NonFiniteMetricError as exc:
                status, error = "failed", str(exc)
        record = CandidateRecord(
            key=request.key,
            generation=request.generation,
            index=request.index,
            vector=request.vector,
            parameters=self.space.named_parameters(np.array(request.vector)) if request.vector else {},
            merge_config=request.merge_config,
            status=status,
            metrics=outcome.metrics,
            score=score,
            error=error,
            timings=outcome.timings.model_copy(update={"round_trip": round_trip}),
            node=outcome.node,
            slot=outcome.slot,
            merge_node_id=outcome.merge_node_id,
            eval_node_id=outcome.eval_node_id,
            attempts=outcome.attempts,
            worker_deaths=outcome.worker_deaths,
            finished_at=time.time(),
            kind=request.kind,
            label=request.label,
            held_out=request.held_out,
            search_key=request.search_key,
            item_scores=outcome.item_scores,
        )
        if request.kind != "candidate" or request.held_out:
            return self._record_reference(record)
        self.store.write_record(record)
        self.evaluated_this_run += 1
        log.info("candidate %d.%d %s recorded: %s", record.generation, record.index, record.key,
                 f"fitness {score:.6f}" if status == "ok" else f"failed ({error})")
        failpoint("after-record")
        self.records[record.key] = record
        if record.status == "ok" and (self._best is None or score > self._best.score):
            self._best = record
            self.write_best_config()
        self.write_summary()
        return record

    def _record_reference(self, record: CandidateRecord) -> CandidateRecord:
        """A baseline or a held-out score: kept apart from the search (never told to CMA-ES,
        never counted in the budget, never the best config)."""
        folder, found = ("held_out", self.held_out) if record.held_out else ("baselines", self.baselines)
        self.store.write_record(record, folder=folder)
        what = f"baseline: {record.label}" if record.kind == "baseline" else f"candidate {record.generation}.{record.index}"
        log.info("%s%s %s recorded: %s", "held out: " if record.held_out else "", what, record.key,
                 f"fitness {record.score:.6f}" if record.status == "ok" else f"failed ({record.error})")
        found[record.key] = record
        self.write_summary()
        return record

    def finish_generation(self, plan: GenerationPlan) -> None:
        """Tell CMA-ES (when the whole generation has records) and log the generation."""
        missing = [k for k in dict.fromkeys(plan.keys) if k not in self.records]
        if not plan.complete or missing:
            self.finished_reason = (
                f"evaluation budget spent inside generation {plan.generation} "
                f"({self.evaluations} of {self.spec.options.max_fevals})"
            )
            self.write_summary()
            return
        new = [self.records[r.key] for r in plan.to_evaluate]
        failed = [r for r in new if r.status == "failed"]
        scores = plan.scores(self.records)
        self.optimizer.tell(plan.vectors, scores)
        self._count_idle(plan.generation, plan.keys)
        failpoint("after-tell")
        self.generations_done += 1
        self.generations_this_run += bool(plan.to_evaluate)
        self.write_checkpoint(plan, scores)
        failpoint("after-checkpoint")
        self.write_summary()
        if too_many_failures(len(failed), len(new), self.spec.options.max_failed_fraction):
            errors = "\n".join(f"  candidate {r.generation}.{r.index}: {r.error}" for r in failed)
            self.finished_reason = "too many failures"
            raise RunStoppedError(
                f"{len(failed)} of {len(new)} candidates of generation {plan.generation} failed "
                f"(more than {self.spec.options.max_failed_fraction:.0%}); stopping. Errors:\n{errors}"
            )

    def write_checkpoint(self, plan: GenerationPlan, scores: list[float]) -> GenerationCheckpoint:
        checkpoint = GenerationCheckpoint(
            format_version=CHECKPOINT_FORMAT_VERSION,
            fingerprint=self.spec.fingerprint(),
            generation=plan.generation,
            keys=list(plan.keys),
            vectors=plan.vectors.tolist(),
            scores_told=scores,
            sigma_after=self.optimizer.sigma,
            mean_after=self.optimizer.mean.tolist(),
            evaluations=self.evaluations,
            best_key=self._best.key if self._best else None,
            written_at=time.time(),
        )
        self.store.write_text(
            checkpoint_name(plan.generation),
            checkpoint.model_dump_json(indent=2) + "\n",
            failpoint_name="checkpoint-write",
        )
        return checkpoint

    # --- outputs ---------------------------------------------------------------------------
    @property
    def best(self) -> CandidateRecord | None:
        return self._best

    def write_best_config(self) -> None:
        if self._best is not None:
            self.store.write_text("best_config.yaml", best_config_yaml(self._best))

    def summary(self) -> dict[str, Any]:
        best = self._best
        ok = [r for r in self.records.values() if r.status == "ok"]
        timings = {
            part: float(np.mean([getattr(r.timings, part) for r in ok])) if ok else None
            for part in ("merge", "load", "evaluate", "total", "round_trip")
        }
        return {
            "storage_path": self.spec.storage_path,
            "fingerprint": self.spec.fingerprint(),
            "evaluations": self.evaluations,
            "max_fevals": self.spec.options.max_fevals,
            "failed_evaluations": sum(r.status == "failed" for r in self.records.values()),
            "generations": self.generations_done,
            "popsize": self.optimizer.popsize,
            "dimension": self.space.dimension,
            "best_fitness": best.score if best else None,
            "best_key": best.key if best else None,
            "best_generation": best.generation if best else None,
            "best_metrics": {
                t.name: {t.metric: best.metrics.get(t.name, {}).get(t.metric)}
                for t in self.spec.config.tasks
            } if best else None,
            "best_parameters": best.parameters if best else None,
            "mean_seconds_per_candidate": timings,
            "finished_reason": self.finished_reason,
            "paused": self.paused,
            "elapsed_seconds": self.elapsed_seconds,
            "comparison": comparison_summary(self.comparison(), self.spec.config.held_out_tasks),
        }

    def write_summary(self) -> None:
        self.store.write_json("summary.json", self.summary())

    # --- storage path ownership ------------------------------------------------------------
    def _check_or_write_manifest(self) -> None:
        fingerprint = self.spec.fingerprint()
        if not check_storage_path(self.spec, self.store):
            self.store.write_json(
                "run.json",
                {
                    "fingerprint": fingerprint,
                    "config": self.spec.config.model_dump(mode="json"),
                    "options": self.spec.options.model_dump(mode="json"),
                    "models": self.spec.models.model_dump(mode="json"),
                    "dimension": self.space.dimension,
                    "parameter_labels": self.space.labels(),
                    "created_at": time.time(),
                },
            )


def check_storage_path(spec: RunSpec, store: RunStore | None = None) -> bool:
    """Whether the storage path already holds this search; raises if it holds another one."""
    store = store or RunStore(spec.storage_path)
    manifest = store.read_json("run.json")
    if manifest is None:
        return False
    fingerprint = spec.fingerprint()
    if manifest.get("fingerprint") != fingerprint:
        raise StorageMismatchError(
            f"storage path {spec.storage_path} holds another search (fingerprint "
            f"{manifest.get('fingerprint')}, this one {fingerprint}): the config, seed, "
            "sigma0 or popsize differ. Use a new --storage-path, or the original settings "
            "to continue that search"
        )
    return True


def best_config_yaml(record: CandidateRecord) -> str:
    header = (
        f"# evomerge best merge: fitness {record.score:.6f} "
        f"(generation {record.generation}, candidate {record.index}, key {record.key})\n"
        "# merge it with: mergekit-yaml best_config.yaml OUTPUT_FOLDER\n"
    )
    return header + yaml.safe_dump(record.merge_config, sort_keys=False, default_flow_style=None)
