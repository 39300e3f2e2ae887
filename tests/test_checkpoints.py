"""Generation checkpoints: written after each tell, replayed exactly, damage detected and survived."""

import json

import numpy as np
import pytest
from test_search_session import make_spec, run

from evomerge.core.checkpoint import CHECKPOINT_FORMAT_VERSION, CorruptStateError, parse_checkpoint
from evomerge.search_session import SearchSession


def trajectory(storage):
    """Every asked vector, told score and step size, from the checkpoints on disk."""
    out = []
    for path in sorted((storage / "checkpoints").glob("*.json")):
        cp = json.loads(path.read_text())
        out.append(
            (cp["generation"], cp["keys"], cp["vectors"], cp["scores_told"], cp["sigma_after"], cp["mean_after"])
        )
    return out


@pytest.fixture
def straight(tmp_path):
    session = run(SearchSession(make_spec(tmp_path / "straight", max_fevals=16, seed=4)))
    return tmp_path / "straight", session


def test_a_checkpoint_per_told_generation_with_a_format_version(straight):
    storage, session = straight
    files = sorted(p.name for p in (storage / "checkpoints").iterdir())
    assert files == ["00000.json", "00001.json", "00002.json", "00003.json"]
    cp = json.loads((storage / "checkpoints" / "00003.json").read_text())
    assert cp["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert cp["sigma_after"] == session.searcher.sigma
    assert cp["mean_after"] == session.searcher.mean.tolist()
    # records in the store when it was written: distinct merges (a repeated suggestion, such as
    # the same corner of the box asked twice, reuses its record)
    assert cp["evaluations"] == sum(r.generation <= 3 for r in session.records.values())
    assert 12 < cp["evaluations"] <= 16


def test_resume_rebuilds_the_optimizer_from_checkpoints_without_records(straight, tmp_path):
    """The optimizer state comes from the checkpoints alone: with the records gone, resuming
    still reaches the exact CMA-ES state of the uninterrupted run."""
    storage, session = straight
    for record in (storage / "records").iterdir():
        record.unlink()
    resumed = SearchSession(make_spec(storage, max_fevals=16, seed=4))
    assert resumed.generations_done == 4
    assert resumed.searcher.sigma == session.searcher.sigma
    assert np.array_equal(resumed.searcher.mean, session.searcher.mean)
    assert resumed.restore_notes == []


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage-bytes", "wrong-types", "not-an-object", "foreign-version", "other-search", "empty"]
)
def test_a_damaged_checkpoint_is_reported_and_resume_falls_back_to_the_last_good_one(straight, tmp_path, damage):
    storage, session = straight
    reference = trajectory(storage)
    target = storage / "checkpoints" / "00002.json"
    text = target.read_text()
    if damage == "truncated":
        target.write_text(text[: len(text) // 2])
    elif damage == "garbage-bytes":  # e.g. a disk or copy that flipped bytes: not UTF-8 at all
        target.write_bytes(text[:100].encode() + b"\xff\xfe\x80" + text[103:].encode())
    elif damage == "wrong-types":
        target.write_text(text.replace('"generation": 2', '"generation": "two"'))
    elif damage == "not-an-object":
        target.write_text("[1, 2, 3]")
    elif damage == "foreign-version":
        target.write_text(text.replace(f'"format_version": {CHECKPOINT_FORMAT_VERSION}', '"format_version": 99'))
    elif damage == "other-search":
        cp = json.loads(text)
        cp["fingerprint"] = "0" * 16
        target.write_text(json.dumps(cp))
    else:
        target.write_text("")

    resumed = SearchSession(make_spec(storage, max_fevals=16, seed=4))
    (note,) = resumed.restore_notes
    assert str(target) in note and "last good checkpoint (generation 1)" in note
    expected_reason = {
        "truncated": "not valid JSON",
        "garbage-bytes": "byte 100 of",
        "wrong-types": "does not hold a valid checkpoint",
        "not-an-object": "is not a checkpoint",
        "foreign-version": "format version 99",
        "other-search": "another search",
        "empty": "is empty",
    }[damage]
    assert expected_reason in note

    evaluated = []
    original = resumed.record_outcome
    resumed.record_outcome = lambda req, out, round_trip=0.0: (
        evaluated.append(req.key),
        original(req, out, round_trip),
    )[1]
    run(resumed)
    assert evaluated == [], "generations 2 and 3 are replayed from their records"
    assert resumed.generations_done == 4
    assert trajectory(storage) == reference, "checkpoints 2 and 3 written again, identical"


def test_a_checkpoint_from_another_optimizer_is_refused_not_followed(straight):
    storage, _ = straight
    target = storage / "checkpoints" / "00001.json"
    cp = json.loads(target.read_text())
    cp["vectors"][0][0] += 1e-12  # what another pycma version asking other vectors looks like
    target.write_text(json.dumps(cp))
    with pytest.raises(CorruptStateError, match="asks other vectors in generation 1 than were stored"):
        SearchSession(make_spec(storage, max_fevals=16, seed=4))


def test_parse_checkpoint_checks_shape_and_generation():
    base = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "fingerprint": "f",
        "generation": 3,
        "keys": ["a", "b"],
        "vectors": [[0.1], [0.2]],
        "scores_told": [1.0],
        "sigma_after": 0.1,
        "mean_after": [0.1],
        "evaluations": 2,
    }
    with pytest.raises(CorruptStateError, match="2 keys, 2 vectors and 1 scores"):
        parse_checkpoint(json.dumps(base), "cp", "f", 3)
    base["scores_told"] = [1.0, 2.0]
    assert parse_checkpoint(json.dumps(base), "cp", "f", 3).generation == 3
    with pytest.raises(CorruptStateError, match="holds generation 3, not 4"):
        parse_checkpoint(json.dumps(base), "cp", "f", 4)
    with pytest.raises(CorruptStateError, match="not a checkpoint"):
        parse_checkpoint("[1, 2]", "cp", "f", 3)


def test_a_disk_that_fills_up_at_a_checkpoint_stops_the_run_and_resume_finishes_it(straight, tmp_path, monkeypatch):
    import errno

    from evomerge.backends import run_store
    from evomerge.backends.run_store import StorageError

    real_write = run_store._write_local_atomically

    def full_at_checkpoint_2(target, data, failpoint_name=None):
        if target.endswith("checkpoints/00002.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(target, data, failpoint_name)

    storage = tmp_path / "full"
    monkeypatch.setattr(run_store, "_write_local_atomically", full_at_checkpoint_2)
    with pytest.raises(StorageError, match="00002.json: No space left on device"):
        run(SearchSession(make_spec(storage, max_fevals=16, seed=4)))
    assert sorted(p.name for p in (storage / "checkpoints").iterdir()) == ["00000.json", "00001.json"]
    monkeypatch.setattr(run_store, "_write_local_atomically", real_write)

    resumed = SearchSession(make_spec(storage, max_fevals=16, seed=4))
    assert resumed.generations_done == 3, "generation 2 was recorded whole: told again from its records"
    assert resumed.restore_notes == []
    run(resumed)
    assert trajectory(storage) == trajectory(straight[0])


def test_a_barrier_free_step_round_trips_through_its_checkpoint_and_old_ones_drew_nothing_ahead():
    from test_searcher import cma_box, run_on_slots

    from evomerge.core.checkpoint import GenerationCheckpoint

    steps, _ = run_on_slots(cma_box(), slots=5, budget=30, seed=11)
    step = next(s for s in steps if s.ahead)
    checkpoint = GenerationCheckpoint.of_step(
        step,
        searcher="cma-es-box",
        fingerprint="f",
        keys=["k"] * len(step.vectors),
        evaluations=1,
        best_key=None,
        written_at=0.0,
    )
    parsed = parse_checkpoint(checkpoint.model_dump_json(), "cp", "f", step.generation, "cma-es-box")
    assert parsed.step() == step
    old = json.loads(checkpoint.model_dump_json())
    del old["ahead"]  # what 0.1-0.3 wrote
    assert parse_checkpoint(json.dumps(old), "cp", "f", step.generation, "cma-es-box").step().ahead == 0
