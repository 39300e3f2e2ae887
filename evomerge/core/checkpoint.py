"""The checkpoint of one searcher step: what the searcher was told, and what it became (pure).

A checkpoint is JSON, written atomically after each step (``evomerge.core.searcher.SearchStep``):
the asked vectors, their candidate keys, the scores told, and for CMA-ES the step size and mean
afterwards. It holds no optimizer object: resume rebuilds the searcher by replaying the
checkpoints through a new searcher of the same seed, which checks step by step that it asks
exactly the recorded vectors and reaches exactly the recorded state. Reading a checkpoint
therefore never executes anything (no pickle), and a checkpoint from another seed, pycma version
or evomerge version is detected instead of silently steering the search somewhere else.

Format version 1 is the one evomerge 0.1 wrote (CMA-ES only); ``searcher`` defaults to it.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.core.searcher import SearchStep

CHECKPOINT_FORMAT_VERSION = 1


class CorruptStateError(ValueError):
    """A stored file cannot be used: truncated, not JSON, of another format version, or not
    matching this search."""


class GenerationCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    fingerprint: str  # of the search (RunSpec.fingerprint); another search's file is refused
    generation: int
    keys: list[str]
    vectors: list[list[float]]
    scores_told: list[float]
    sigma_after: float | None = None  # CMA-ES only
    mean_after: list[float] | None = None  # CMA-ES only
    evaluations: int  # records in the store when it was written
    best_key: str | None = None
    written_at: float = 0.0
    searcher: str = "cma-es"
    ahead: int = 0  # vectors drawn ahead from this generation's distribution (barrier-free)

    @classmethod
    def of_step(
        cls,
        step: SearchStep,
        *,
        searcher: str,
        fingerprint: str,
        keys: list[str],
        evaluations: int,
        best_key: str | None,
        written_at: float,
    ) -> GenerationCheckpoint:
        return cls(
            format_version=CHECKPOINT_FORMAT_VERSION,
            fingerprint=fingerprint,
            generation=step.generation,
            keys=keys,
            vectors=[list(v) for v in step.vectors],
            scores_told=list(step.scores_told),
            sigma_after=step.sigma_after,
            mean_after=None if step.mean_after is None else list(step.mean_after),
            evaluations=evaluations,
            best_key=best_key,
            written_at=written_at,
            searcher=searcher,
            ahead=step.ahead,
        )

    def step(self) -> SearchStep:
        return SearchStep(
            self.generation,
            tuple(tuple(v) for v in self.vectors),
            tuple(self.scores_told),
            self.sigma_after,
            None if self.mean_after is None else tuple(self.mean_after),
            ahead=self.ahead,
        )


def parse_checkpoint(
    text: str | None, where: str, fingerprint: str, generation: int, searcher: str = "cma-es"
) -> GenerationCheckpoint:
    """Validate a stored checkpoint; any problem is a CorruptStateError naming ``where``."""
    if not text:
        raise CorruptStateError(f"{where} is empty")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptStateError(f"{where} is not valid JSON (truncated?): {exc}") from exc
    if not isinstance(raw, dict):
        raise CorruptStateError(f"{where} is not a checkpoint (a JSON object is expected)")
    version = raw.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CorruptStateError(
            f"{where} has format version {version!r}; this evomerge reads version {CHECKPOINT_FORMAT_VERSION}"
        )
    try:
        checkpoint = GenerationCheckpoint.model_validate(raw)
    except ValidationError as exc:
        raise CorruptStateError(f"{where} does not hold a valid checkpoint: {exc}") from exc
    if checkpoint.fingerprint != fingerprint:
        raise CorruptStateError(f"{where} belongs to another search (fingerprint {checkpoint.fingerprint})")
    if checkpoint.searcher != searcher:
        raise CorruptStateError(f"{where} was written by the {checkpoint.searcher} searcher, not {searcher}")
    if checkpoint.generation != generation:
        raise CorruptStateError(f"{where} holds generation {checkpoint.generation}, not {generation}")
    n = len(checkpoint.keys)
    if n == 0 or len(checkpoint.vectors) != n or len(checkpoint.scores_told) != n:
        raise CorruptStateError(
            f"{where} has {n} keys, {len(checkpoint.vectors)} vectors and "
            f"{len(checkpoint.scores_told)} scores; they must be equal and non-zero"
        )
    return checkpoint
