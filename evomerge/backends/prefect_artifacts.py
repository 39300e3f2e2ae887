"""Publishes a run's checkpoints as Prefect artifacts: the candidates of each generation (a
table, on the generation's subflow run), the best configuration so far (markdown) and the run's
progress (on the evolve flow run).

Artifact keys carry the search's fingerprint, so every flow run of one search (a resumed run,
the next scheduled run) adds versions to the same artifacts in the UI. Publishing is best
effort: a Prefect API hiccup is logged, never the end of a search whose files are safe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from evomerge.core.records import CandidateRecord
from evomerge.core.run_report import best_config_markdown, candidate_rows, progress_line, progress_percent

log = logging.getLogger("evomerge")


def artifact_key(fingerprint: str, what: str) -> str:
    return f"evomerge-{fingerprint.lower()}-{what}"


def publish_candidates(session, generation: int, records: Iterable[CandidateRecord]) -> None:
    from prefect.artifacts import create_table_artifact

    rows = candidate_rows(records, session.spec.config.tasks)
    _best_effort(
        create_table_artifact,
        table=rows,
        key=artifact_key(session.spec.fingerprint(), "candidates"),
        description=f"Candidates of generation {generation}: parameters, metrics, fitness, slot",
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
        _best_effort(
            create_markdown_artifact,
            markdown=best_config_markdown(best, s.evaluations, max_fevals),
            key=artifact_key(fingerprint, "best-config"),
            description=f"Best merge configuration after generation {generation}",
        )
        percent = progress_percent(s.evaluations, max_fevals)
        description = progress_line(generation, s.evaluations, max_fevals, best.score if best else None,
                                    s.elapsed_seconds)
        if self._progress_id is None:
            self._progress_id = _best_effort(
                create_progress_artifact, progress=percent,
                key=artifact_key(fingerprint, "progress"), description=description,
            )
        else:
            _best_effort(update_progress_artifact, artifact_id=self._progress_id, progress=percent,
                         description=description)


    def finish(self) -> None:
        """Nothing to close: every artifact is complete when written."""


def _best_effort(create, **kwargs):
    try:
        return create(**kwargs)
    except Exception as exc:
        log.warning("could not publish the Prefect artifact %s (%s); the run goes on",
                    kwargs.get("key", "progress"), exc)
        return None
