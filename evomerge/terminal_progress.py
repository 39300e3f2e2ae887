"""One progress line per generation on the terminal; nothing when output is not a terminal
(a deployment's worker, a pipe, CI), where the Prefect UI and the logs say the same."""

from __future__ import annotations

import sys
from typing import TextIO

from evomerge.core.run_report import progress_line


class TerminalProgress:
    def __init__(self, session, stream: TextIO | None = None):
        self.session = session
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()

    def generation_done(self, generation: int, keys) -> None:
        if not self.enabled:
            return
        session = self.session
        scores = [
            session.records[k].score for k in keys if k in session.records and session.records[k].score is not None
        ]
        done_here = session.evaluated_this_run
        left = session.budget_left
        seconds_left = session.elapsed_seconds / done_here * left if done_here else None
        best = session.best.score if session.best else None
        line = progress_line(
            generation,
            session.evaluations,
            session.spec.options.max_fevals,
            best,
            session.elapsed_seconds,
            sum(scores) / len(scores) if scores else None,
            seconds_left,
            session.slot_utilization,
        )
        print(f"evomerge: {line}", file=self.stream, flush=True)

    def finish(self) -> None:
        """Nothing to close: each line is complete when printed."""
