"""Flow ``evolve``: one search, run by the search loop (``evomerge.search_loop``), each batch an
``evaluate`` subflow on a RayTaskRunner. Its parameters are ``config``, ``storage_path`` and the
CLI's options in snake_case, generated from ``RunOptions`` (so the deployment's parameter schema
is too).
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from prefect import flow, get_run_logger

from evomerge.backends.prefect_artifacts import CheckpointPublisher
from evomerge.backends.prepare import build_options, prepare_run
from evomerge.backends.ray_task_runner import RayTaskRunner
from evomerge.backends.run_lease import RunLease
from evomerge.backends.run_store import RunStore
from evomerge.backends.slot_pool import slot_pool
from evomerge.core.options import option_parameters, options_from_parameters
from evomerge.core.records import CandidateRequest
from evomerge.core.run_spec import RunSpec
from evomerge.final_model import save_final_model
from evomerge.flows.evaluate import evaluate as evaluate_flow
from evomerge.flows.evaluate import evaluate_stream, stream_runner
from evomerge.search_loop import Phase, run_search_loop
from evomerge.search_session import SearchSession
from evomerge.terminal_progress import TerminalProgress


def _evolve(config: str, storage_path: str, **options: Any) -> dict[str, Any]:
    """Search the best merge of the models in a mergekit-evolve config.

    Args:
        config: the mergekit-evolve YAML file.
        storage_path: where records, checkpoints and the best config go (folder or s3://).
    """
    spec = prepare_run(config, storage_path, build_options(**options_from_parameters(options)))
    return run_search(spec)


_evolve.__signature__ = inspect.Signature(
    [  # type: ignore[attr-defined]
        inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str),
        inspect.Parameter("storage_path", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str),
        *option_parameters(),
    ],
    return_annotation=dict[str, Any],
)

evolve = flow(name="evolve", flow_run_name="evolve-{storage_path}", validate_parameters=False)(_evolve)


def run_search(spec: RunSpec) -> dict[str, Any]:
    """The search for a validated RunSpec, holding the storage path's lease throughout."""
    logger = get_run_logger()
    store = RunStore(spec.storage_path)
    store.check_writable()  # a deployment run validates here (the CLI checked before it started)
    with RunLease(store) as lease:
        if lease.taken_over is not None:
            logger.warning("took over the stale lease of %s", lease.taken_over.describe(time.time()))
        session = SearchSession(spec, store)
        try:
            evaluate_on_ray = evaluate_flow.with_options(task_runner=RayTaskRunner(address=spec.options.ray_address))
            stream_on_ray = evaluate_stream.with_options(task_runner=RayTaskRunner(address=spec.options.ray_address))
            # Who hears of each evaluated generation: Prefect artifacts, the terminal, wandb.
            observers = [CheckpointPublisher(session), TerminalProgress(session)]
            if spec.options.wandb:
                from evomerge.backends.wandb_logger import WandbLogger

                observers.append(WandbLogger(session))
            with slot_pool(spec) as slots:
                if not session.search_finished:
                    slots.launch()  # Ray and the slots start while the baselines are planned

                def run_batch(phase: Phase, requests: list[CandidateRequest]) -> None:
                    evaluate_on_ray(phase, requests, slots.refs(), session.id)

                run_stream = stream_runner(stream_on_ray, slots.refs, session.id)
                run_search_loop(session, run_batch, observers, logger, run_stream)
            if not session.paused and spec.options.save_final_model and (final := save_final_model(session)):
                logger.info("best merge saved in %s", final)
            if not session.paused:
                session.check_some_candidate_scored()
            return session.summary()
        finally:
            session.close()
