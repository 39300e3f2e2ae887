"""Fail points: armed through the environment, by name, by hit count or by subject, once across
processes with a shared folder; unarmed, nothing happens."""

import pytest

from evomerge import failpoints
from evomerge.failpoints import failpoint


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    monkeypatch.setattr(failpoints, "_hits", failpoints.Counter())


def test_unarmed_points_do_nothing(monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoint("after-tell")
    failpoint("slot-evaluate", "0.1")


def test_a_subject_is_struck_alone_and_the_nth_hit_alone(monkeypatch):
    monkeypatch.setenv(failpoints.ENV, "slot-evaluate:0.2=raise,after-tell@2=raise")
    failpoint("slot-evaluate", "0.1")
    failpoint("slot-evaluate")
    with pytest.raises(RuntimeError, match="fail point slot-evaluate:0.2 fired"):
        failpoint("slot-evaluate", "0.2")
    failpoint("after-tell")
    with pytest.raises(RuntimeError, match="after-tell fired"):
        failpoint("after-tell")
    failpoint("after-tell")


def test_a_shared_folder_fires_each_point_once_across_processes(monkeypatch, tmp_path):
    monkeypatch.setenv(failpoints.ENV, "slot-evaluate:1.0=raise,after-record=sleep:0")
    monkeypatch.setenv(failpoints.ONCE_DIR_ENV, str(tmp_path))
    with pytest.raises(RuntimeError):
        failpoint("slot-evaluate", "1.0")
    failpoint("slot-evaluate", "1.0")  # a restarted worker reaching it again: already fired
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot-evaluate:1.0"]
