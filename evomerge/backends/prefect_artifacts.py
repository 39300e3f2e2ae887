"""Publishes a run's checkpoints as Prefect artifacts: the candidates of each generation (a
table, on the generation's subflow run), the best configuration so far (markdown), the best
candidates against the baselines (markdown), the fitness plot (image) and the run's progress
(on the evolve flow run).

Artifact keys carry the search's fingerprint, so every flow run of one search (a resumed run,
the next scheduled run) adds versions to the same artifacts in the UI. Publishing is best
effort: a Prefect API hiccup is logged, never the end of a search whose files are safe.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable

from evomerge.backends.merge_config_yaml import merge_config_yaml
from evomerge.backends.report_plot import fitness_plot_png
from evomerge.core.records import CandidateRecord
from evomerge.core.run_report import (
    best_config_markdown,
    candidate_rows,
    comparison_markdown,
    progress_line,
    progress_percent,
)
from evomerge.search_loop import Phase

log = logging.getLogger("evomerge")


def artifact_key(fingerprint: str, what: str) -> str:
    return f"evomerge-{fingerprint.lower()}-{what}"


def publish_batch(session, phase, records: Iterable[CandidateRecord]) -> None:
    """The table of a batch on its subflow run: a generation's candidates (parameters, metrics,
    fitness, slot); after the baselines or the held-out scores, also the comparison on the run."""
    if phase.kind == "generation":
        _publish_table(
            session,
            "candidates",
            records,
            f"Candidates of generation {phase.generation}: parameters, metrics, fitness, slot",
        )
        return
    _publish_table(session, phase.kind, records, f"Scored in the {phase.kind} phase: metrics, fitness, slot")
    _publish_comparison(session, f"after the {phase.kind}")


def _publish_table(session, what: str, records: Iterable[CandidateRecord], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    config = session.spec.config
    _best_effort(
        create_table_artifact,
        table=candidate_rows(records, [*config.tasks, *(config.held_out_tasks or [])]),
        key=artifact_key(session.spec.fingerprint(), what),
        description=description,
    )


def _publish_comparison(session, when: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    config = session.spec.config
    _best_effort(
        create_markdown_artifact,
        markdown=comparison_markdown(session.comparison(), config.tasks, config.held_out_tasks),
        key=artifact_key(session.spec.fingerprint(), "comparison"),
        description=f"Best candidates against the parents and the uniform merge, {when}",
    )


def _publish_plot(session, generation: int) -> None:
    """The fitness plot, as a markdown artifact holding the PNG in a ``data:`` URL: the UI shows
    it without any file server (a ~40 kB PNG, stored in the artifact). Both Prefect UIs render
    data-URL images in markdown; an image artifact would also print the whole URL as text."""
    from prefect.artifacts import create_markdown_artifact

    png = fitness_plot_png(
        session.records.values(),
        session.baselines.values(),
        title=f"fitness over evaluations, after generation {generation}",
    )
    _best_effort(
        create_markdown_artifact,
        markdown=f"![fitness over evaluations](data:image/png;base64,{base64.b64encode(png).decode()})\n",
        key=artifact_key(session.spec.fingerprint(), "fitness-plot"),
        description=f"Fitness of every candidate, best so far and baselines, after generation {generation}",
    )


class CheckpointPublisher:
    """Best configuration and progress, updated after every checkpoint of one flow run."""

    def __init__(self, session):
        self.session = session
        self._progress_id = None

    def generation_done(self, generation: int, keys=()) -> None:
        from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

        s = self.session
        fingerprint = s.spec.fingerprint()
        max_fevals = s.spec.options.max_fevals
        best = s.best
        if s.spec.options.barrier_free:  # no subflow run per generation to put its table on
            publish_batch(s, Phase("generation", generation), s.new_records(generation, keys))
        _best_effort(
            create_markdown_artifact,
            markdown=best_config_markdown(
                best, merge_config_yaml(best.merge_config) if best else "", s.evaluations, max_fevals
            ),
            key=artifact_key(fingerprint, "best-config"),
            description=f"Best merge configuration after generation {generation}",
        )
        percent = progress_percent(s.evaluations, max_fevals)
        description = progress_line(
            generation,
            s.evaluations,
            max_fevals,
            best.score if best else None,
            s.elapsed_seconds,
            slot_utilization=s.slot_utilization,
        )
        _publish_comparison(s, f"after generation {generation}")
        _publish_plot(s, generation)
        if self._progress_id is None:
            self._progress_id = _best_effort(
                create_progress_artifact,
                progress=percent,
                key=artifact_key(fingerprint, "progress"),
                description=description,
            )
        else:
            _best_effort(
                update_progress_artifact, artifact_id=self._progress_id, progress=percent, description=description
            )

    def finish(self) -> None:
        """Nothing to close: every artifact is complete when written."""


def _best_effort(create, **kwargs):
    try:
        return create(**kwargs)
    except Exception as exc:
        log.warning(
            "could not publish the Prefect artifact %s (%s); the run goes on", kwargs.get("key", "progress"), exc
        )
        return None
