"""--wandb in offline mode: what wandb wrote is read back from its run file."""

from __future__ import annotations

import struct
from pathlib import Path

from test_search_session import make_spec, run

from evomerge.search_session import SearchSession


def wandb_records(path: Path) -> list:
    """The records of a wandb run file (a LevelDB-style log of protobuf Records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_generation_statistics_best_score_and_best_config_reach_wandb(tmp_path, monkeypatch):
    from evomerge.backends.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "sentinel-wandb-key-8901" + "0" * 17)
    (tmp_path / "wandb-dir").mkdir()
    session = SearchSession(make_spec(tmp_path / "run", max_fevals=8, seed=1, wandb=True, wandb_project="evo-test"))
    logger = WandbLogger(session)
    run(session, observers=[logger])
    logger.finish()

    (run_file,) = (tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)

    def key(item):
        return item.key or "/".join(item.nested_key)

    history = [
        {key(item): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["_step"] for h in history] == ["0", "1"], history
    for h in history:
        assert {
            "fitness/mean",
            "fitness/max",
            "fitness/min",
            "t1/acc,none/mean",
            "t2/acc,none/max",
            "best/fitness",
            "evaluations",
            "failed",
        } <= set(h)
    assert float(history[-1]["best/fitness"]) == session.best.score
    assert history[-1]["evaluations"] == "8"
    summary = {
        key(u): u.value_json for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update
    }
    assert float(summary["best_fitness"]) == session.best.score
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.name == f"best-config-{session.spec.fingerprint()}" and artifact.type == "merge-config"
    assert [entry.path for entry in artifact.manifest.contents] == ["best_config.yaml"]
    written = b"".join(p.read_bytes() for p in (tmp_path / "wandb-dir").rglob("*") if p.is_file())
    assert b"sentinel-wandb-key-8901" not in written


def test_offline_runs_go_where_wandb_puts_them_without_wandb_dir(tmp_path, monkeypatch):
    """Without WANDB_DIR, wandb's convention: ./wandb in the working directory (not /tmp)."""
    from evomerge.backends.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    import wandb

    wandb.teardown()  # wandb keeps its settings per process: the test before set WANDB_DIR
    session = SearchSession(make_spec(tmp_path / "run", max_fevals=4, seed=1, wandb=True, wandb_project="evo-test"))
    logger = WandbLogger(session)
    run(session, observers=[logger])
    logger.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")), "the run file is under ./wandb"
