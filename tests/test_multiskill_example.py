"""The shipped demo (examples/multiskill): its data are what make_data.py writes, its splits never
overlap, and its config, models and tasks pass evomerge's validation as shipped."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO

EXAMPLE = REPO / "examples" / "multiskill"


def make_data():
    spec = importlib.util.spec_from_file_location("multiskill_make_data", EXAMPLE / "tasks" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_data_are_regenerated_byte_for_byte_and_the_splits_are_disjoint(tmp_path):
    module = make_data()
    written = module.write_data(tmp_path)
    assert {p.name for p in written} == {
        f"{s}_{split}.jsonl" for s in ("shift", "rev") for split in ("validation", "test")
    }
    inputs = {}
    for path in written:
        assert path.read_bytes() == (EXAMPLE / "tasks" / "data" / path.name).read_bytes(), path.name
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        split = path.stem.split("_", 1)[1]
        assert len(rows) == (200 if split == "validation" else 500)
        assert all(module.split_of(r["input"]) == split for r in rows), "no item of a training string"
        inputs.setdefault(split, set()).update(r["input"] for r in rows)
    assert not inputs["validation"] & inputs["test"]


def test_the_demo_config_validates_as_shipped(monkeypatch):
    from evomerge.backends.prepare import build_options, prepare_run

    monkeypatch.chdir(REPO)
    spec = prepare_run(
        "examples/multiskill/config.yml",
        "/tmp/unused-storage",
        build_options(task_search_path=["examples/multiskill/tasks"]),
    )
    assert spec.models.num_layers == 4 and spec.search_space().dimension == 8
    assert [t.name for t in spec.config.held_out_tasks] == ["multiskill_shift_test", "multiskill_rev_test"]
    assert spec.include_default_tasks is False
