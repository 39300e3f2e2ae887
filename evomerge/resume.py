"""Resume: a new searcher of the same seed is taken through the stored checkpoints again.

Each checkpoint is one searcher step; ``Searcher.replay`` checks bit for bit that the new
searcher asks the recorded vectors and reaches the recorded state. Replay stops at the first
missing or unreadable checkpoint (named in a note): the steps after it are replayed from their
records by the session, which writes their checkpoints again. No optimizer state is ever
deserialised, and nothing read from the storage path is executed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from evomerge.backends.run_store import DamagedFileError, RunStore
from evomerge.core.checkpoint import CorruptStateError, GenerationCheckpoint, parse_checkpoint
from evomerge.core.searcher import ReplayMismatchError, Searcher
from evomerge.core.storage_layout import checkpoint_name


def replay_checkpoints(
    searcher: Searcher, store: RunStore, fingerprint: str, on_damaged: Callable[[str], None]
) -> Iterator[GenerationCheckpoint]:
    """Replay every readable checkpoint through ``searcher``, in order; yields each one replayed.

    A damaged checkpoint (empty, not JSON, another format, search or searcher) ends the replay
    with a note; a checkpoint that replays differently (another pycma or evomerge version)
    raises CorruptStateError: following it would steer the search somewhere else.
    """
    step = 0
    while True:
        where = store.path(checkpoint_name(step))
        try:
            text = store.read_text(checkpoint_name(step))
            if text is None:
                return
            checkpoint = parse_checkpoint(text, where, fingerprint, step, searcher.name)
        except (CorruptStateError, DamagedFileError) as exc:
            on_damaged(
                f"{exc}; resuming from the last good checkpoint "
                f"({'none' if step == 0 else f'generation {step - 1}'}) and the records written after it"
            )
            return
        try:
            searcher.replay(checkpoint.step())
        except ReplayMismatchError as exc:
            raise CorruptStateError(
                f"{where}: {exc}, so the files were written by another pycma or evomerge version. "
                "Continue with the versions that wrote them, or use a new --storage-path"
            ) from exc
        yield checkpoint
        step += 1
