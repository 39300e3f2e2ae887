"""SlotWorker: merges and scores candidates on one evaluation slot (a GPU, or a CPU slot).

Everything expensive to rebuild lives here for the slot's whole life: the lm-eval task objects,
the tokenizer cache, the merge options. ``run`` never raises for a candidate's own failure: it
returns a failed outcome with the error, so one bad candidate never ends the run. Plain Python,
so tests can drive it without Ray; ``evomerge.backends.slot_pool`` runs it as a Ray actor.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evomerge.backends.evaluator_hf import HFEvaluator, Scores
from evomerge.backends.merger_disk import DiskMerger
from evomerge.backends.race_board import RaceBoard, RayRaceBoard
from evomerge.backends.racer import Racer
from evomerge.backends.resident_model import Resident
from evomerge.backends.run_store import RunStore
from evomerge.core.records import CandidateRequest, EvaluationOutcome, Timings, error_summary
from evomerge.core.run_spec import RunSpec
from evomerge.failpoints import failpoint


class SlotWorker:
    def __init__(self, spec: RunSpec, slot: str, threads: int = 1, race_board: Any = None):
        import torch

        os.chdir(spec.working_dir)  # lm-eval resolves relative data_files against the cwd
        self.spec = spec
        self.slot = slot
        self.node = platform.node()
        use_cuda = torch.cuda.is_available()
        if not use_cuda:
            torch.set_num_threads(threads)
        self.store = RunStore(spec.storage_path)
        self.merger = DiskMerger(spec.options, use_cuda=use_cuda and spec.options.merge_cuda)
        device = "cuda" if use_cuda else "cpu"
        # Upstream passes None (lm-eval's 1). On a GPU, "auto" finds the largest batch that
        # fits; on a CPU, 16 keeps a small model's evaluation from being all overhead.
        batch_size = spec.options.batch_size or ("auto" if use_cuda else 16)
        self._evaluator_args = dict(
            device=device,
            batch_size=batch_size,
            dtype=spec.models.dtype,
            trust_remote_code=spec.options.trust_remote_code,
        )
        if spec.options.vllm:
            self._evaluator_args["seed"] = spec.options.seed
        self.evaluator = self._make_evaluator(held_out=False)
        self._held_out_evaluator = None  # built when the first held-out score is asked for
        self.racer = None
        if spec.options.racing:  # the run's board actor under Ray; in-process, this slot's own board
            board = RaceBoard() if race_board is None else RayRaceBoard(race_board)
            self.racer = Racer(spec, self.evaluator, board)
        self.resident: Resident | None = None
        if spec.options.in_memory and spec.options.vllm:
            from evomerge.backends.resident_engine import ResidentEngine

            self.resident = ResidentEngine.for_run(spec, self.evaluator)
        elif spec.options.in_memory:
            from evomerge.backends.resident_model import ResidentModel

            self.resident = ResidentModel(spec, device=device, batch_size=batch_size)

    def _make_evaluator(self, held_out: bool) -> HFEvaluator:
        if self.spec.options.vllm:
            from evomerge.backends.evaluator_vllm import VLLMEvaluator as evaluator_cls
        else:
            evaluator_cls = HFEvaluator
        # Held-out scores keep every item's metric: the report compares models item by item.
        return evaluator_cls(
            self.spec.evaluation_for(held_out),
            self.spec.options.task_search_path,
            self.spec.include_default_tasks,
            per_item=held_out,
            **self._evaluator_args,
        )

    def _evaluator_for(self, request: CandidateRequest) -> HFEvaluator:
        if not request.held_out:
            return self.evaluator
        if self._held_out_evaluator is None:
            self._held_out_evaluator = self._make_evaluator(held_out=True)
        return self._held_out_evaluator

    @property
    def node_id(self) -> str:
        """The Ray node this worker runs on ("" outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def close(self) -> str | None:
        """Release what could outlive this worker's process (a resident vLLM engine); says what."""
        resident, self.resident = self.resident, None
        if resident is None:
            return None
        resident.close()
        return f"{self.slot}: {type(resident).__name__} shut down"

    def describe(self) -> dict[str, str]:
        return {"slot": self.slot, "node": self.node, "node_id": self.node_id, "pid": str(os.getpid())}

    def run(self, request: CandidateRequest) -> EvaluationOutcome:
        """Pool strategy: merge and score in this worker (into its resident model with --in-memory)."""
        out_dir = self.store.scratch_dir(request.key)

        evaluator = self._evaluator_for(request)

        def merge_and_score(timings: Timings) -> Scores:
            # In memory, baselines too: a parent is a passthrough merge of one resident source
            # (an engine slot must not start a second engine beside its resident one).
            if self.resident is not None:
                timings.merge = self.resident.merge(request.merge_config)
                return self._scoring(request, evaluator)(self.resident.lm)
            t0 = time.perf_counter()
            self.merger.merge(request.merge_config, out_dir)
            timings.merge = time.perf_counter() - t0
            return evaluator.evaluate(out_dir, self._scoring(request, evaluator))

        return self._outcome(request, merge_and_score, cleanup=out_dir, merge_node_id=self.node_id)

    def evaluate_merged(self, request: CandidateRequest, merged: MergedCandidate) -> EvaluationOutcome:
        """Serial and buffered strategies: score a folder merged by a merge task on this node."""

        def score(timings: Timings) -> Scores:
            timings.merge = merged.seconds
            if merged.error:
                raise CandidateMergeError(merged.error)
            evaluator = self._evaluator_for(request)
            return evaluator.evaluate(merged.path, self._scoring(request, evaluator))

        return self._outcome(request, score, cleanup=merged.path, merge_node_id=merged.node_id)

    def _scoring(self, request: CandidateRequest, evaluator: HFEvaluator) -> Callable[[Any], Scores]:
        """How a loaded candidate is scored: in racing stages (a search candidate with
        --racing), or on every item at once."""
        if self.racer is not None and request.kind == "candidate" and not request.held_out:
            return functools.partial(self.racer.race, request)
        return evaluator.score

    def _outcome(self, request: CandidateRequest, work, *, cleanup: str, merge_node_id: str) -> EvaluationOutcome:
        """Run ``work(timings) -> Scores`` and turn whatever happens into an outcome. The fitness
        is not computed here: the session computes it once, from the metrics."""
        started = time.perf_counter()
        timings = Timings()
        metrics: dict = {}
        items: dict = {}
        race = None
        try:
            failpoint(
                "slot-evaluate", f"{request.generation}.{request.index}"
            )  # tests kill, hang or fail the worker here
            scores = work(timings)
            metrics, items, race = _numeric_metrics(scores.results), scores.item_scores, scores.race
            timings.load, timings.evaluate = scores.load_seconds, scores.evaluate_seconds
            status, error = "ok", None
        except CandidateMergeError as exc:
            status, error = "failed", str(exc)
        except Exception as exc:  # a candidate's failure is data, not the end of the run
            status, error = "failed", error_summary(exc)
        finally:
            shutil.rmtree(cleanup, ignore_errors=True)
        timings.total = time.perf_counter() - started
        return EvaluationOutcome(
            status=status,
            metrics=metrics,
            error=error,
            timings=timings,
            node=self.node,
            slot=self.slot,
            merge_node_id=merge_node_id,
            eval_node_id=self.node_id,
            item_scores=items,
            race=race,
        )


class CandidateMergeError(RuntimeError):
    """The merge task of a serial or buffered candidate failed (its message is the record's error)."""


@dataclass(frozen=True)
class MergedCandidate:
    """What a merge task hands to the evaluating slot: a folder on the slot's node, or an error."""

    path: str
    seconds: float
    node_id: str
    error: str | None = None


def merge_to_folder(spec: RunSpec, request: CandidateRequest) -> MergedCandidate:
    """The merge task of the serial and buffered strategies (runs in a Ray worker pinned to the
    slot's node). A failure is returned, not raised: the slot records it as the candidate's."""
    import ray
    import torch

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    path = RunStore(spec.storage_path).scratch_dir(request.key)
    started = time.perf_counter()
    try:
        shutil.rmtree(path, ignore_errors=True)  # a merge left behind by a stopped run
        merger = _disk_merger(spec.options, torch.cuda.is_available() and spec.options.merge_cuda)
        merger.merge(request.merge_config, path)
        return MergedCandidate(path, time.perf_counter() - started, node_id)
    except Exception as exc:
        shutil.rmtree(path, ignore_errors=True)
        return MergedCandidate(path, time.perf_counter() - started, node_id, f"merge failed: {error_summary(exc)}")


_MERGERS: dict[tuple[str, bool], DiskMerger] = {}


def _disk_merger(options, use_cuda: bool) -> DiskMerger:
    # Ray reuses worker processes for later tasks of the run: build mergekit's options once each.
    key = (options.model_dump_json(), use_cuda)
    if key not in _MERGERS:
        _MERGERS[key] = DiskMerger(options, use_cuda=use_cuda)
    return _MERGERS[key]


def _numeric_metrics(results: dict) -> dict[str, dict[str, float | None]]:
    """Each task's metrics (``name,filter`` keys); lm-eval's other fields (alias, name,
    sample_len) and the stderr entries are left out."""
    out: dict[str, dict[str, float | None]] = {}
    for task, values in results.items():
        out[task] = {
            k: (float(v) if isinstance(v, (int, float)) else None)
            for k, v in values.items()
            if "," in k and "_stderr" not in k
        }
    return out
