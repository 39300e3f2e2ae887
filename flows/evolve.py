"""Flow ``evolve``: the CMA-ES loop. Its parameters are the CLI's options, in snake_case.

baselines (parents, uniform merge) -> [ask -> plan (dedupe, skip recorded keys, cap by budget) ->
generation subflow on Ray -> tell -> log the generation -> stop?] -> held-out scores of the best.
The loop is here, in the open; every step is a library call.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect_ray import RayTaskRunner

from evomerge.backends.prefect_artifacts import CheckpointPublisher
from evomerge.backends.prepare import build_options, prepare_run
from evomerge.backends.run_lease import RunLease
from evomerge.backends.run_store import RunStore
from evomerge.backends.slot_pool import SlotsOnDemand
from evomerge.core.options import RunOptions
from evomerge.core.run_spec import RunSpec
from evomerge.failpoints import failpoint
from evomerge.final_model import save_final_model
from evomerge.terminal_progress import TerminalProgress
from evomerge.search_session import SearchSession
from flows.generation import generation
from flows.references import references


@flow(name="evolve", flow_run_name="evolve-{storage_path}", validate_parameters=False)
def evolve(
    config: str,
    storage_path: str,
    max_fevals: int = 100,
    vllm: bool = False,
    strategy: str = "pool",
    in_memory: bool = False,
    num_gpus: int | None = None,
    merge_cuda: bool = True,
    trust_remote_code: bool = False,
    allow_crimes: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    sigma0: float = 1 / 6,
    wandb: bool = False,
    wandb_project: str | None = None,
    wandb_entity: str | None = None,
    task_search_path: list[str] | None = None,
    allow_benchmark_tasks: bool = False,
    save_final_model: bool = True,
    reshard: bool = True,
    timeout: float | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    popsize: int | None = None,
    ray_address: str | None = None,
    cpu_slots: int | None = None,
    max_failed_fraction: float = 0.5,
    slot_start_timeout: float = 600.0,
    candidate_timeout: float = 3600.0,
    worker_retries: int = 2,
    generations_per_run: int | None = None,
    baselines: bool = True,
    held_out_top: int = 3,
) -> dict[str, Any]:
    values = dict(locals())
    values["task_search_path"] = values["task_search_path"] or []
    options = build_options(**{k: v for k, v in values.items() if k in RunOptions.model_fields})
    spec = prepare_run(config, storage_path, options)
    return run_search(spec)


def run_search(spec: RunSpec) -> dict[str, Any]:
    """The loop, for a validated RunSpec, holding the storage path's lease throughout."""
    store = RunStore(spec.storage_path)
    with RunLease(store) as lease:
        if lease.taken_over is not None:
            get_run_logger().warning(
                "took over the stale lease of %s", lease.taken_over.describe(time.time())
            )
        session = SearchSession(spec, store)
        try:
            return _search_loop(spec, session)
        finally:
            session.close()


def _search_loop(spec: RunSpec, session: SearchSession) -> dict[str, Any]:
    logger = get_run_logger()
    for note in session.restore_notes:
        logger.warning(note)
    if session.records or session.generations_done:
        logger.info(
            "storage path holds %d records and %d generation checkpoints: continuing from them",
            len(session.records), session.generations_done,
        )
    run_generation = generation.with_options(task_runner=RayTaskRunner(address=spec.options.ray_address))
    run_references = references.with_options(task_runner=RayTaskRunner(address=spec.options.ray_address))
    # Who hears of each evaluated generation: Prefect artifacts, the terminal, wandb.
    observers = [CheckpointPublisher(session), TerminalProgress(session)]
    if spec.options.wandb:
        from evomerge.backends.wandb_logger import WandbLogger

        observers.append(WandbLogger(session))
    try:
        with SlotsOnDemand(spec) as slots:
            # What a user would pick by hand, scored first: a configuration error in the tasks
            # (or held-out tasks) shows here, before the search spends anything.
            if baselines := session.baseline_requests():
                run_references("baselines", baselines, slots.refs(), session.id)
            while (reason := session.should_stop()) is None:
                plan = session.next_generation()
                failpoint("after-ask")
                if plan.to_evaluate:
                    run_generation(plan.generation, list(plan.to_evaluate), slots.refs(), session.id)
                session.finish_generation(plan)
                if plan.to_evaluate:
                    for observer in observers:
                        observer.generation_done(plan.generation, plan.keys)
                best = session.best
                logger.info(
                    "generation %d: %d evaluated, %d of %d evaluations spent, best fitness %s",
                    plan.generation, len(plan.to_evaluate), session.evaluations,
                    spec.options.max_fevals, f"{best.score:.4f}" if best else "none",
                )
            # The search is over (not paused): score the best candidates on the held-out tasks.
            if session.search_finished and (held_out := session.held_out_requests()):
                run_references("held-out", held_out, slots.refs(), session.id)
    finally:
        for observer in observers:
            observer.finish()
    session.finished_reason = reason
    session.write_summary()
    if session.paused:
        logger.info("run paused: %s", reason)
        return session.summary()
    logger.info("search finished: %s", reason)
    if spec.options.save_final_model and (final := save_final_model(session)):
        logger.info("best merge saved in %s", final)
    return session.summary()
