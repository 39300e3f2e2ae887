"""The checkpoint of one told generation: what CMA-ES was told, and what it became (pure).

A checkpoint is JSON, written atomically after each ``tell``: the asked vectors, their keys, the
scores told, and the optimizer's step size and mean afterwards. It holds no optimizer object:
resume rebuilds CMA-ES by replaying the checkpoints through a new optimizer of the same seed and
checks, generation by generation, that it asks exactly the recorded vectors and reaches exactly
the recorded step size and mean. Reading a checkpoint therefore never executes anything (no
pickle), and a checkpoint from another seed, pycma version or evomerge version is detected
instead of silently steering the search somewhere else.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, ValidationError

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
    sigma_after: float
    mean_after: list[float]
    evaluations: int  # records in the store when it was written
    best_key: str | None = None
    written_at: float = 0.0


def parse_checkpoint(text: str | None, where: str, fingerprint: str, generation: int) -> GenerationCheckpoint:
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
            f"{where} has format version {version!r}; this evomerge reads version "
            f"{CHECKPOINT_FORMAT_VERSION}"
        )
    try:
        checkpoint = GenerationCheckpoint.model_validate(raw)
    except ValidationError as exc:
        raise CorruptStateError(f"{where} does not hold a valid checkpoint: {exc}") from exc
    if checkpoint.fingerprint != fingerprint:
        raise CorruptStateError(f"{where} belongs to another search (fingerprint {checkpoint.fingerprint})")
    if checkpoint.generation != generation:
        raise CorruptStateError(f"{where} holds generation {checkpoint.generation}, not {generation}")
    n = len(checkpoint.keys)
    if n == 0 or len(checkpoint.vectors) != n or len(checkpoint.scores_told) != n:
        raise CorruptStateError(f"{where} has {n} keys, {len(checkpoint.vectors)} vectors and "
                                f"{len(checkpoint.scores_told)} scores; they must be equal and non-zero")
    return checkpoint


def checkpoint_name(generation: int) -> str:
    return f"checkpoints/{generation:05d}.json"
