"""SearchSession: one search on one storage path, between the loop and the store.

A coordinator: the searcher proposes (``core.searcher``), batches are planned
(``core.batch_plan``), outcomes become records (``core.records``), the stopping rules decide
(``core.stopping``), ``summary.json`` is assembled (``core.run_summary``), the storage path's
manifest is checked (``run_manifest``) and a resumed searcher replays the checkpoints
(``resume``). It keeps nothing the store cannot rebuild: started again on the same storage path
with the same settings, it replays the checkpoints, tells again any step whose records outlived
its checkpoint, and continues where the store ends.

Results are told to the searcher one at a time, as they are recorded; the searcher's step (for
CMA-ES, a whole generation) is checkpointed the moment it completes.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from typing import Any

import numpy as np

from evomerge.backends.merge_config_yaml import best_config_yaml
from evomerge.backends.run_store import RunStore
from evomerge.core.batch_plan import BatchPlan, best_record, plan_batch
from evomerge.core.checkpoint import GenerationCheckpoint
from evomerge.core.fitness import MissingMetricError, too_many_failures
from evomerge.core.records import CandidateRecord, CandidateRequest, EvaluationOutcome
from evomerge.core.references import baseline_requests, held_out_requests, top_candidates
from evomerge.core.run_report import ComparisonRow, comparison_for, comparison_summary
from evomerge.core.run_spec import RunSpec
from evomerge.core.run_summary import run_summary
from evomerge.core.searcher import CmaEsSearcher, RandomSearcher, Searcher, SearchStep, Suggestion
from evomerge.core.slot_utilization import slot_utilization
from evomerge.core.stopping import IDLE_GENERATIONS_LIMIT, SearchProgress, StoppingRules
from evomerge.core.storage_layout import (
    BASELINES,
    BEST_CONFIG,
    CANDIDATES,
    CHECKPOINTS,
    HELD_OUT,
    SUMMARY,
    checkpoint_name,
    record_name,
)
from evomerge.core.suggestion_feed import SuggestionFeed
from evomerge.failpoints import failpoint
from evomerge.resume import replay_checkpoints
from evomerge.run_manifest import ensure_manifest

log = logging.getLogger("evomerge")


class RunStoppedError(RuntimeError):
    """The run cannot go on (a configuration error shown by the first evaluation, or a
    generation in which most candidates failed)."""


def make_searcher(spec: RunSpec) -> Searcher:
    space = spec.search_space()
    options = spec.options
    if options.searcher == "random":
        return RandomSearcher(*space.box(), options.seed, spec.popsize())
    rng = np.random.default_rng(options.seed)
    x0 = space.initial_point(rng if spec.config.random_init else None)
    assert options.sigma0 is not None  # RunOptions fills in the searcher's default
    box = space.box() if options.searcher in ("cma-es-box", "cma-es-box-mirrored-elitist") else None
    mirrored_elitist = options.searcher == "cma-es-box-mirrored-elitist"
    return CmaEsSearcher(
        x0, options.sigma0, options.seed, options.popsize, box=box, mirrored=mirrored_elitist, elitist=mirrored_elitist
    )


class SearchSession:
    # Sessions of this process by id. The batch subflow runs in the evolve flow's process and
    # finds its session here: passed as a flow parameter, the session (records, searcher,
    # storage client) would be serialized into every task's context by Prefect.
    _active: dict[str, SearchSession] = {}

    def __init__(self, spec: RunSpec, store: RunStore | None = None):
        self.id = uuid.uuid4().hex
        SearchSession._active[self.id] = self
        self.spec = spec
        self.store = store or RunStore(spec.storage_path)
        self.space = spec.search_space()
        self.settings = spec.evaluation
        ensure_manifest(spec, self.store)
        self.searcher = make_searcher(spec)
        self.rules = StoppingRules(
            spec.options.max_fevals, spec.options.timeout, spec.options.generations_per_run, spec.options.max_items
        )
        # What resume had to work around (unreadable files), for the flow to show.
        self.restore_notes: list[str] = []
        self.records = self.store.read_records(self.restore_notes.append, folder=CANDIDATES)
        # Not searcher candidates: parents and the uniform merge, and held-out scores.
        self.baselines = self.store.read_records(self.restore_notes.append, folder=BASELINES)
        self.held_out = self.store.read_records(self.restore_notes.append, folder=HELD_OUT)
        if spec.options.retry_failed:
            self._set_failed_aside()
        self.progress = SearchProgress(
            evaluations=len(self.records),
            items_scored=sum(r.race.items_scored for r in self.records.values() if r.race is not None),
        )
        self.started = time.monotonic()
        self.finished_reason: str | None = None
        self.paused = False  # stopped by --generations-per-run: the search itself goes on later
        self._best = best_record(self.records)
        self._open: BatchPlan | None = None  # the batch whose results are being told
        self._untold: dict[str, list[int]] = {}  # key -> ids of the open batch still waiting for it
        self._pending: BatchPlan | None = None  # opened while resuming, handed out next
        self._recorded_here: list[CandidateRecord] = []  # candidates this run evaluated
        # Each generation's candidate keys by index, filled as its suggestions are planned.
        self._keys: dict[int, dict[int, str]] = {}
        # Barrier-free: what an idle slot gets next (the session itself keeps the budget).
        self._feed = SuggestionFeed(self.searcher, sys.maxsize, True, self._redraw_recorded_ahead)
        self.completed: list[tuple[int, tuple[str, ...]]] = []  # steps not yet shown to observers
        for checkpoint in replay_checkpoints(self.searcher, self.store, spec.fingerprint(), self.restore_notes.append):
            self._count_step(checkpoint.generation, checkpoint.keys, evaluated_here=False)
        if not spec.options.barrier_free:
            self._replay_recorded_batches()

    def check_some_candidate_scored(self) -> None:
        """A finished search with no successful candidate is an error, not a result: it names
        the first failure and the way to score the failed candidates again once it is fixed."""
        if self.best is not None or not self.records:
            return
        first = min(self.records.values(), key=lambda r: (r.generation, r.index))
        raise RunStoppedError(
            f"no candidate was scored: all {len(self.records)} evaluations failed, the first with "
            f"{first.error} (records/{first.key}.json; best_config.yaml was not written). Fix the "
            "cause, then run the same command with --retry-failed to evaluate them again"
        )

    def _set_failed_aside(self) -> None:
        """--retry-failed: failed records go to quarantine/ (kept, not deleted), and with them
        every checkpoint from the first generation that told a failure: those generations are
        rebuilt from the remaining records, and the failed candidates evaluated again."""
        moved, told_from = 0, None
        for folder, records in ((CANDIDATES, self.records), (BASELINES, self.baselines), (HELD_OUT, self.held_out)):
            for key, record in [(k, r) for k, r in records.items() if r.status == "failed"]:
                self.store.set_aside(record_name(folder, key))
                del records[key]
                moved += 1
                if folder == CANDIDATES:
                    told_from = record.generation if told_from is None else min(told_from, record.generation)
        if not moved:
            return
        # Checkpoints run 0, 1, ... without a gap (replay stops at the first missing one).
        stored = set(self.store.list_names(CHECKPOINTS))
        checkpoints = []
        step = told_from
        while step is not None and checkpoint_name(step).rpartition("/")[2] in stored:
            checkpoints.append(checkpoint_name(step))
            step += 1
        for name in checkpoints:
            self.store.set_aside(name)
        self.restore_notes.append(
            f"--retry-failed: {moved} failed record(s) moved to quarantine/"
            + (f", and the checkpoints of generation {told_from} on ({len(checkpoints)})" if checkpoints else "")
            + "; they are evaluated again"
        )

    @classmethod
    def active(cls, session_id: str) -> SearchSession:
        return cls._active[session_id]

    def close(self) -> None:
        SearchSession._active.pop(self.id, None)

    # --- counters ---------------------------------------------------------------------------
    @property
    def elapsed_seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def evaluations(self) -> int:
        return self.progress.evaluations

    @property
    def budget_left(self) -> int:
        return self.rules.budget_left(self.progress)

    @property
    def generations_done(self) -> int:
        return self.progress.generations_done

    @property
    def evaluated_this_run(self) -> int:
        return self.progress.evaluated_this_run

    @property
    def search_finished(self) -> bool:
        """The search itself is over (budget spent, or converged), not just this run."""
        return self.rules.search_finished(self.progress)

    def should_stop(self) -> str | None:
        if self.finished_reason:
            return self.finished_reason
        decision = self.rules.decide(self.progress, self.elapsed_seconds)
        if decision is None:
            return None
        self.paused = decision.paused
        return decision.reason

    def _count_step(self, generation: int, keys, evaluated_here: bool) -> None:
        """A step is idle when none of its merges was first evaluated in it (derived from the
        records, so a resumed run counts the same)."""
        fresh = any((r := self.records.get(k)) is not None and r.generation == generation for k in keys)
        self.progress.idle_generations = 0 if fresh else self.progress.idle_generations + 1
        self.progress.generations_done += 1
        self.progress.generations_this_run += evaluated_here

    # --- batches ----------------------------------------------------------------------------
    def _replay_recorded_batches(self) -> None:
        """Tell the steps after the last checkpoint whose candidates all have records (a kill
        between a step's last record and its checkpoint, or a damaged checkpoint), writing their
        checkpoints again; the first batch that needs evaluating waits as the next one."""
        while self.progress.idle_generations < IDLE_GENERATIONS_LIMIT:  # a converged search asks no more
            plan = self._open_batch()
            if plan.to_evaluate or not plan.complete:
                self._pending = plan
                return
            self.finish_batch(plan)

    def next_batch(self) -> BatchPlan:
        if self._pending is not None:
            plan, self._pending = self._pending, None
            return plan
        return self._open_batch()

    def _open_batch(self) -> BatchPlan:
        """Ask the searcher, plan the batch, and tell at once what the records already know."""
        suggestions = self.searcher.ask()
        if not suggestions:
            raise RuntimeError(f"the {self.searcher.name} searcher asked nothing while no batch was open")
        self._check_finite(suggestions)
        plan = plan_batch(self.space, self.settings, suggestions, self.records, self.budget_left)
        self._open, self._untold = plan, {}
        self._keys[plan.generation] = dict(enumerate(plan.keys))
        for key, ids in plan.suggestion_ids_by_key().items():
            if key in self.records:
                for suggestion_id in ids:
                    self._tell(suggestion_id, self.records[key])
            else:
                self._untold[key] = ids
        return plan

    def _check_finite(self, suggestions: list[Suggestion]) -> None:
        if not all(np.all(np.isfinite(s.vector)) for s in suggestions):
            raise RunStoppedError(
                f"the {self.searcher.name} searcher asked a vector with NaN or infinity in generation "
                f"{suggestions[0].generation} (its state degenerated); the records and the best config "
                "so far are kept"
            )

    def _tell(self, suggestion_id: int, record: CandidateRecord) -> None:
        step = self.searcher.tell(suggestion_id, record.score if record.status == "ok" else None)
        if step is not None:
            self._step_completed(step)

    def _step_completed(self, step: SearchStep) -> None:
        by_index = self._keys.pop(step.generation)
        keys = tuple(by_index[i] for i in range(len(step.vectors)))
        here = {r.key for r in self._recorded_here}
        self._count_step(step.generation, keys, evaluated_here=any(k in here for k in keys))
        failpoint("after-tell")
        self.write_checkpoint(step, keys)
        failpoint("after-checkpoint")
        self.completed.append((step.generation, keys))

    def finish_batch(self, plan: BatchPlan) -> None:
        """After a batch's evaluations: the summary, and the stops a batch can cause (its budget
        ran out inside it, or most of its candidates failed)."""
        self._open = None
        if not plan.complete or self._untold:
            self.finished_reason = (
                f"evaluation budget spent inside generation {plan.generation} "
                f"({self.evaluations} of {self.spec.options.max_fevals})"
            )
            self.write_summary()
            return
        self.completed.clear()  # the loop shows this batch to the observers itself
        self.write_summary()
        self._stop_if_most_failed(plan.generation, [self.records[r.key] for r in plan.to_evaluate])

    def generation_told(self, generation: int, keys: tuple[str, ...]) -> None:
        """Barrier-free: after a generation's step (``completed``), what ``finish_batch`` does
        after a batch: the summary, and the stop when most of its new candidates failed."""
        self.write_summary()
        self._stop_if_most_failed(generation, self.new_records(generation, keys))

    def new_records(self, generation: int, keys) -> list[CandidateRecord]:
        """The records first evaluated as candidates of this generation (a key may repeat)."""
        return [r for k in dict.fromkeys(keys) if (r := self.records.get(k)) is not None and r.generation == generation]

    def _stop_if_most_failed(self, generation: int, new: list[CandidateRecord]) -> None:
        failed = [r for r in new if r.status == "failed"]
        if too_many_failures(len(failed), len(new), self.spec.options.max_failed_fraction):
            errors = "\n".join(f"  candidate {r.generation}.{r.index}: {r.error}" for r in failed)
            self.finished_reason = "too many failures"
            raise RunStoppedError(
                f"{len(failed)} of {len(new)} candidates of generation {generation} failed "
                f"(more than {self.spec.options.max_failed_fraction:.0%}); stopping. Errors:\n{errors}"
            )

    # --- barrier-free: one candidate at a time -----------------------------------------------
    def next_request(self) -> CandidateRequest | None:
        """``--barrier-free``: what an idle slot evaluates next. The open generation's next
        candidate; once they are all out, one drawn ahead for a coming generation. None while
        the search should stop or the budget is taken by what is running (asked again after the
        next result). A merge scored before is told at once; one being scored waits for it."""
        while self.should_stop() is None and self.budget_left > len(self._untold):
            suggestion = self._feed.next()
            if suggestion is None:
                return None
            self._check_finite([suggestion])
            plan = plan_batch(self.space, self.settings, [suggestion], self.records.keys() | self._untold.keys(), 1)
            (key,) = plan.keys
            self._keys.setdefault(suggestion.generation, {})[suggestion.index] = key
            if key in self.records:
                self._tell(suggestion.id, self.records[key])
            elif key in self._untold:
                self._untold[key].append(suggestion.id)
            else:
                self._untold[key] = [suggestion.id]
                return plan.to_evaluate[0]
        return None

    def stream_stalled(self) -> str:
        """Why a barrier-free stream ended although no stopping rule fired: the searcher had
        nothing to ask with nothing running (never expected; a reason instead of a hang)."""
        self.finished_reason = (
            f"the {self.searcher.name} searcher had nothing to ask in generation {self.searcher.generation} "
            "with no candidate running"
        )
        return self.finished_reason

    def _redraw_recorded_ahead(self, generation: int) -> list[Suggestion]:
        """Resuming: vectors drawn ahead while ``generation`` was open, before the run stopped,
        have records at later generations. Draw as many again, now, before the generation is
        told (where they were drawn): the same vectors, so their records are used and the search
        continues as it was."""
        held = set(self.searcher.held_ahead())
        recorded = [(r.generation, r.index) for r in self.records.values() if r.generation > generation]
        last = max((p for p in recorded if p not in held), default=None)
        drawn: list[Suggestion] = []
        while last is not None and (not drawn or (drawn[-1].generation, drawn[-1].index) < last):
            suggestion = self.searcher.ask_ahead()
            if suggestion is None:
                break
            drawn.append(suggestion)
        return drawn

    # --- results ----------------------------------------------------------------------------
    def record_outcome(
        self, request: CandidateRequest, outcome: EvaluationOutcome, round_trip: float = 0.0
    ) -> CandidateRecord:
        """Store a result at once (a crash later loses nothing of it) and tell the searcher.

        A metric that no task produces fails every candidate alike: a configuration error that
        stops the run at the first evaluation instead of spending a generation on it."""
        try:
            record = CandidateRecord.from_outcome(
                request,
                outcome,
                self.spec.evaluation_for(request.held_out).tasks,
                self.space.named_parameters(np.array(request.vector)) if request.vector else {},
                round_trip,
                time.time(),
            )
        except MissingMetricError as exc:
            raise RunStoppedError(f"stopping at the first evaluation: {exc}") from exc
        if request.kind != "candidate" or request.held_out:
            return self._record_reference(record)
        self.store.write_record(record)
        self.progress.evaluations += 1
        self.progress.evaluated_this_run += 1
        log.info(
            "candidate %d.%d %s recorded: %s%s",
            record.generation,
            record.index,
            record.key,
            f"fitness {record.score:.6f}" if record.status == "ok" else f"failed ({record.error})",
            ""
            if record.fully_scored
            else f" on {record.race.items_scored} of {record.race.items_full} items (raced out)",
        )
        failpoint("after-record")
        self.records[record.key] = record
        self._recorded_here.append(record)
        if record.race is not None:
            self.progress.items_scored += record.race.items_scored
        if record.status == "ok" and record.fully_scored and (self._best is None or record.score > self._best.score):
            self._best = record
            self.store.write_text(BEST_CONFIG, best_config_yaml(record))
        for suggestion_id in self._untold.pop(record.key, []):
            self._tell(suggestion_id, record)
        return record

    def _record_reference(self, record: CandidateRecord) -> CandidateRecord:
        """A baseline or a held-out score: kept apart from the search (never told to the
        searcher, never counted in the budget, never the best config)."""
        folder, found = (HELD_OUT, self.held_out) if record.held_out else (BASELINES, self.baselines)
        self.store.write_record(record, folder=folder)
        what = (
            f"baseline: {record.label}"
            if record.kind == "baseline"
            else f"candidate {record.generation}.{record.index}"
        )
        log.info(
            "%s%s %s recorded: %s",
            "held out: " if record.held_out else "",
            what,
            record.key,
            f"fitness {record.score:.6f}" if record.status == "ok" else f"failed ({record.error})",
        )
        found[record.key] = record
        return record

    # --- baselines and held-out scores -------------------------------------------------------
    def baseline_requests(self) -> list[CandidateRequest]:
        """Parents, the uniform merge (and the fixed weights) not scored yet (on the search's and
        held-out tasks)."""
        if not self.spec.options.baselines:
            return []
        return baseline_requests(
            self.space,
            self.settings,
            self.spec.held_out_evaluation,
            {**self.baselines, **self.held_out},
            fixed=self.spec.options.fixed_baselines,
        )

    def held_out_requests(self) -> list[CandidateRequest]:
        """The best candidates not yet scored on the held-out tasks (none without such tasks)."""
        held_out = self.spec.held_out_evaluation
        if held_out is None:
            return []
        return held_out_requests(top_candidates(self.records, self.spec.options.held_out_top), held_out, self.held_out)

    def comparison(self) -> list[ComparisonRow]:
        return comparison_for(
            self.records, self.baselines, self.held_out, self.spec.config, self.spec.options.held_out_top
        )

    # --- outputs ----------------------------------------------------------------------------
    @property
    def best(self) -> CandidateRecord | None:
        return self._best

    @property
    def slot_utilization(self) -> float | None:
        """How busy this run kept its slots (None before its first candidate)."""
        return slot_utilization(self._recorded_here)

    def write_checkpoint(self, step: SearchStep, keys) -> GenerationCheckpoint:
        checkpoint = GenerationCheckpoint.of_step(
            step,
            searcher=self.searcher.name,
            fingerprint=self.spec.fingerprint(),
            keys=list(keys),
            evaluations=self.evaluations,
            best_key=self._best.key if self._best else None,
            written_at=time.time(),
        )
        self.store.write_text(
            checkpoint_name(step.generation),
            checkpoint.model_dump_json(indent=2) + "\n",
            failpoint_name="checkpoint-write",
        )
        return checkpoint

    def summary(self) -> dict[str, Any]:
        return run_summary(
            storage_path=self.spec.storage_path,
            fingerprint=self.spec.fingerprint(),
            max_fevals=self.spec.options.max_fevals,
            popsize=self.searcher.popsize,
            dimension=self.space.dimension,
            tasks=self.spec.config.tasks,
            records=self.records,
            best=self._best,
            progress=self.progress,
            finished_reason=self.finished_reason,
            paused=self.paused,
            elapsed_seconds=self.elapsed_seconds,
            comparison=comparison_summary(self.comparison(), self.spec.config.held_out_tasks),
            slot_utilization=self.slot_utilization,
        )

    def write_summary(self) -> None:
        self.store.write_json(SUMMARY, self.summary())

    def finish(self, reason: str) -> dict[str, Any]:
        """The run is over (the search, or this run of it): the final summary."""
        self.finished_reason = reason
        self.write_summary()
        return self.summary()
