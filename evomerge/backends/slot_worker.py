"""SlotWorker: merges and scores candidates on one evaluation slot (a GPU, or a CPU slot).

Everything expensive to rebuild lives here for the slot's whole life: the lm-eval task objects,
the tokenizer cache, the merge options. ``run`` never raises for a candidate's own failure: it
returns a failed outcome with the error, so one bad candidate never ends the run. Plain Python,
so tests can drive it without Ray; ``evomerge.backends.slot_pool`` runs it as a Ray actor.
"""

from __future__ import annotations

import os
import platform
import shutil
import time

from evomerge.backends.evaluator_hf import HFEvaluator
from evomerge.backends.merger_disk import DiskMerger
from evomerge.backends.run_store import RunStore
from evomerge.core.fitness import MissingMetricError, weighted_score
from evomerge.core.records import CandidateRequest, EvaluationOutcome, Timings, error_summary
from evomerge.core.run_spec import RunSpec
from evomerge.failpoints import failpoint


class SlotWorker:
    def __init__(self, spec: RunSpec, slot: str, threads: int = 1):
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
        self.evaluator = HFEvaluator(
            spec.evaluation,
            spec.options.task_search_path,
            spec.include_default_tasks,
            device="cuda" if use_cuda else "cpu",
            # Upstream passes None (lm-eval's 1). On a GPU, "auto" finds the largest batch that
            # fits; on a CPU, 16 keeps a small model's evaluation from being all overhead.
            batch_size=spec.options.batch_size or ("auto" if use_cuda else 16),
            dtype=spec.models.dtype,
            trust_remote_code=spec.options.trust_remote_code,
        )

    def describe(self) -> dict[str, str]:
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return {"slot": self.slot, "node": self.node, "node_id": node_id, "pid": str(os.getpid())}

    def run(self, request: CandidateRequest) -> EvaluationOutcome:
        started = time.perf_counter()
        timings = Timings()
        out_dir = self.store.scratch_dir(request.key)
        metrics: dict = {}
        try:
            failpoint("slot-evaluate")  # tests kill, hang or fail the worker here
            t0 = time.perf_counter()
            self.merger.merge(request.merge_config, out_dir)
            timings.merge = time.perf_counter() - t0
            result = self.evaluator.evaluate(out_dir)
            timings.load, timings.evaluate = result.load_seconds, result.evaluate_seconds
            metrics = _numeric_metrics(result.results)
            weighted_score(result.results, self.spec.config.tasks)  # raises on a bad metric
            status, error, fatal = "ok", None, False
        except MissingMetricError as exc:
            status, error, fatal = "failed", str(exc), True
        except Exception as exc:  # a candidate's failure is data, not the end of the run
            status, error, fatal = "failed", error_summary(exc), False
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        timings.total = time.perf_counter() - started
        return EvaluationOutcome(
            status=status, metrics=metrics, error=error, fatal=fatal, timings=timings,
            node=self.node, slot=self.slot,
        )


def _numeric_metrics(results: dict) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for task, values in results.items():
        out[task] = {
            k: (float(v) if isinstance(v, (int, float)) else None)
            for k, v in values.items()
            if k != "alias" and "_stderr" not in k
        }
    return out
