"""``--wandb``: per-generation statistics, the best score and the best configuration in Weights &
Biases.

One wandb run per flow run, grouped by the search's fingerprint so the flow runs of one resumed
search appear together; ``WANDB_MODE=offline`` works as wandb documents it (the tests read the
offline files). The API key is wandb's own business (``WANDB_API_KEY`` or ``wandb login``):
evomerge never reads, logs or stores it, and passes only the run's config and options as the wandb
config (no environment). Logging is best effort: a wandb failure is logged and the search goes on.
"""

from __future__ import annotations

import logging
import os

from evomerge.core.run_report import generation_stats
from evomerge.core.storage_layout import BEST_CONFIG

log = logging.getLogger("evomerge")


class WandbLogger:
    def __init__(self, session):
        import wandb

        spec = session.spec
        self.session = session
        self._wandb = wandb
        self.run = wandb.init(
            project=spec.options.wandb_project or "evomerge",
            entity=spec.options.wandb_entity,
            group=f"search-{spec.fingerprint()}",
            name=f"{os.path.basename(spec.storage_path.rstrip('/'))}-gen{session.generations_done}",
            config={
                "config": spec.config.model_dump(mode="json"),
                "options": spec.options.model_dump(mode="json"),
                "storage_path": spec.storage_path,
                "fingerprint": spec.fingerprint(),
            },
            # No dir: wandb's own convention (WANDB_DIR, else ./wandb in the working directory),
            # where `wandb sync` and users look for offline runs.
            reinit="finish_previous",
        )

    def generation_done(self, generation: int, keys) -> None:
        s = self.session
        records = [s.records[k] for k in dict.fromkeys(keys) if k in s.records]
        stats = generation_stats(records, s.spec.config.tasks, s.best, s.evaluations)
        try:
            self.run.log(stats, step=generation)
            if s.best is not None:
                self.run.summary["best_fitness"] = s.best.score
                self.run.summary["best_key"] = s.best.key
        except Exception as exc:
            log.warning("could not log generation %d to wandb (%s); the run goes on", generation, exc)

    def finish(self) -> None:
        s = self.session
        try:
            best = s.store.read_text(BEST_CONFIG)
            if best is not None:
                artifact = self._wandb.Artifact(
                    f"best-config-{s.spec.fingerprint()}",
                    type="merge-config",
                    metadata={"fitness": s.best.score if s.best else None},
                )
                with artifact.new_file(BEST_CONFIG) as f:
                    f.write(best)
                self.run.log_artifact(artifact)
            self.run.finish()
        except Exception as exc:
            log.warning("could not finish the wandb run (%s)", exc)
