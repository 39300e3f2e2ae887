"""Every kind of damage applied to every file a storage path holds that evomerge reads back: each
takes its documented path (a record is quarantined and evaluated again, a checkpoint ends the
replay, a lease holds nothing, run.json is refused with the way forward, final_model.json means
merging again) and never crashes a resume. A new file kind or damage kind is one table row."""

import json

import pytest
from test_search_session import make_spec, run

from evomerge.backends.run_lease import RunLease, read_lease
from evomerge.backends.run_store import RunStore
from evomerge.run_manifest import StorageMismatchError
from evomerge.search_session import SearchSession

# How a file gets damaged: each takes the file's bytes and returns the damaged bytes.
DAMAGE = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "not-utf8": lambda data: data[:5] + b"\xff\xfe\x80" + data[8:],
    "not-json": lambda data: b"this is not JSON {",
    "wrong-shape": lambda data: b"[1, 2, 3]",
    "wrong-types": lambda data: json.dumps(_retyped(json.loads(data))).encode(),
}


def _retyped(value):
    """The right shape, the wrong types: every number becomes a string and every string 0."""
    if isinstance(value, dict):
        return {k: _retyped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_retyped(v) for v in value]
    if isinstance(value, str):
        return 0
    return "x" if isinstance(value, (int, float)) and not isinstance(value, bool) else value


@pytest.fixture
def finished(tmp_path):
    """A finished search of 8 (two generations) on a local storage path."""
    storage = tmp_path / "run"
    session = run(SearchSession(make_spec(storage, max_fevals=8, seed=2)))
    return storage, session


def damage(path, kind):
    path.write_bytes(DAMAGE[kind](path.read_bytes()))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_record_is_quarantined_and_evaluated_again(finished, kind):
    storage, session = finished
    first = min(session.records.values(), key=lambda r: (r.generation, r.index))
    damage(storage / "records" / f"{first.key}.json", kind)
    resumed = SearchSession(make_spec(storage, max_fevals=8, seed=2))
    (note,) = resumed.restore_notes
    assert first.key in note and "moved to" in note
    assert (storage / "quarantine" / "records" / f"{first.key}.json").exists(), "kept, not deleted"
    run(resumed)  # its score is in checkpoint 0: the search goes on and spends the budget
    assert len(list((storage / "records").glob("*.json"))) == 8 and resumed.evaluations == 8


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_ends_the_replay_and_the_search_ends_the_same(finished, kind):
    storage, session = finished
    told = ("generation", "keys", "vectors", "scores_told", "sigma_after", "mean_after")
    reference = json.loads((storage / "checkpoints" / "00001.json").read_text())
    damage(storage / "checkpoints" / "00001.json", kind)
    resumed = SearchSession(make_spec(storage, max_fevals=8, seed=2))
    (note,) = resumed.restore_notes
    assert "00001.json" in note and "last good checkpoint (generation 0)" in note
    run(resumed)
    again = json.loads((storage / "checkpoints" / "00001.json").read_text())
    assert {k: again[k] for k in told} == {k: reference[k] for k in told}, "written again, the same step"


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_lease_holds_nothing(finished, kind):
    storage, _ = finished
    store = RunStore(str(storage))
    with RunLease(store):
        pass
    (storage / "lease.json").write_text(json.dumps({"owner": "a" * 32, "host": "h", "pid": 1, "heartbeat": 0.0}))
    damage(storage / "lease.json", kind)
    assert read_lease(store) is None
    with RunLease(store) as lease:
        assert read_lease(store).owner == lease.owner


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_run_manifest_is_refused_naming_it_with_the_way_forward(finished, kind):
    storage, session = finished
    damage(storage / "run.json", kind)
    with pytest.raises(StorageMismatchError, match=r"run\.json .*Restore it from a copy, or delete it"):
        SearchSession(make_spec(storage, max_fevals=8, seed=2))
    (storage / "run.json").unlink()
    again = SearchSession(make_spec(storage, max_fevals=8, seed=2))
    assert again.search_finished and again.best.key == session.best.key


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_final_model_marker_means_merging_again(finished, kind, monkeypatch):
    import evomerge.final_model as final_model

    storage, session = finished
    merged = []
    monkeypatch.setattr(
        final_model, "DiskMerger", lambda *a, **k: type("M", (), {"merge": lambda self, c, t: merged.append(t)})()
    )
    (storage / "final_model.json").write_text(json.dumps({"key": session.best.key, "score": session.best.score}))
    damage(storage / "final_model.json", kind)
    final_model.save_final_model(session)
    assert merged == [str(storage / "final_model")]
