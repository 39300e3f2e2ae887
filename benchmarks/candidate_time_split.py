"""Where a candidate's time goes, from a run's records.

    python benchmarks/candidate_time_split.py runs/demo

Per candidate (means over successful records): merge, load, evaluate, the rest of the slot's call
(cleanup), and orchestration (round trip seen by the generation flow minus the slot's call:
Prefect task run, Ray scheduling, transfers). Also the run's wall time per candidate and the slot
utilization it implies, from summary.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(storage: str) -> None:
    root = Path(storage)
    records = [json.loads(p.read_text()) for p in sorted((root / "records").glob("*.json"))]
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        sys.exit(f"no successful records under {root}/records")
    t = {k: np.array([r["timings"][k] for r in ok]) for k in ("merge", "load", "evaluate", "total", "round_trip")}
    parts = {
        "merge": t["merge"],
        "load": t["load"],
        "evaluate": t["evaluate"],
        "slot other (cleanup)": t["total"] - t["merge"] - t["load"] - t["evaluate"],
        "orchestration (round trip - slot)": t["round_trip"] - t["total"],
    }
    total = t["round_trip"].mean()
    print(f"{len(ok)} successful candidates of {len(records)} under {root}")
    print(f"{'part':36s} {'mean s':>8s} {'p90 s':>8s} {'share':>7s}")
    for name, values in parts.items():
        print(f"{name:36s} {values.mean():8.3f} {np.percentile(values, 90):8.3f} {values.mean() / total:7.1%}")
    print(f"{'round trip (sum of the above)':36s} {total:8.3f}")
    summary = json.loads((root / "summary.json").read_text())
    slots = len({r["slot"] for r in ok})
    wall = summary.get("elapsed_seconds")
    if wall:
        busy = t["total"].sum()
        print(
            f"search wall time {wall:.1f} s for {len(records)} evaluations on {slots} slots: "
            f"{wall / len(records):.2f} s per evaluation; slot utilization "
            f"{busy / (slots * wall):.1%} (busy slot-seconds / (slots x wall))"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
