"""Orchestration overhead: the full pipeline (CLI -> Prefect -> Ray) against a bare loop that
makes the same library calls (no Prefect, no Ray), on the same candidates.

    python benchmarks/orchestration_overhead.py [--max-fevals 20] [--popsize 4] [--seed 0] [--keep]

Run from the repository root (models: python examples/tiny/make_models.py --out examples/tiny/models).
Both sides run the tiny example in a fresh process and a fresh storage path, with one evaluation
slot and one torch thread, so they do the same sequential work:

1. bare loop: prepare_run -> SearchSession -> the search loop (``run_search_loop``, the one the
   evolve flow runs) with each batch evaluated by an in-process SlotWorker, in one plain Python
   process;
2. pipeline: ``python -m evomerge.cli ... --cpu-slots 1``, with its private Prefect server
   (PREFECT_API_URL unset) and a private Ray, i.e. what a user runs.

With ``--compare-checkout DIR`` (a checkout of another version with its own ``.venv``, e.g. the
previous release: ``git worktree add /tmp/old v0.1; (cd /tmp/old && ./dev setup)``, and the tiny
models copied or built there), it instead runs the pipeline side of that checkout and of this one,
alternately, ``--rounds`` times each, and prints the medians side by side.

Times come from the parent (process start and exit) and from the records (finished_at, timings),
so both sides are measured the same way. The final-model merge is off on both sides: it is the
same library call either way and is not orchestration; so are the baselines (the same evaluations
either way), so the start-up is process start to the first search candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "examples/tiny/config.yml"
TASKS = "examples/tiny/tasks"


def bare_loop(storage: str, max_fevals: int, popsize: int, seed: int) -> None:
    """The child process of side 1: the loop of flows/evolve.py and the slot call of the pool
    strategy, with the orchestration taken out."""
    from evomerge.backends.prepare import build_options, prepare_run
    from evomerge.backends.run_lease import RunLease
    from evomerge.backends.run_store import RunStore
    from evomerge.backends.slot_worker import SlotWorker
    from evomerge.search_loop import inline_runner, run_search_loop
    from evomerge.search_session import SearchSession

    options = build_options(
        max_fevals=max_fevals,
        popsize=popsize,
        seed=seed,
        cpu_slots=1,
        task_search_path=[TASKS],
        save_final_model=False,
        baselines=False,
    )
    spec = prepare_run(CONFIG, storage, options)
    store = RunStore(spec.storage_path)
    with RunLease(store):  # run_search holds it too; it is storage, not orchestration
        session = SearchSession(spec, store)
        worker = SlotWorker(spec, "slot-0", threads=1)  # the pipeline's CPU slot gets num_cpus=1
        run_search_loop(session, inline_runner(session, worker.run))
        session.close()


def child_env() -> dict[str, str]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        # same BLAS/torch threads in every process of both sides (Ray sets this for its
        # workers from num_cpus=1; the bare process gets it here)
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env.pop("PREFECT_API_URL", None)  # the CLI starts its private server, as for a user
    return env


def run_side(cmd: list[str], log_path: Path) -> tuple[float, float]:
    """Run one side in a fresh process; (start, end) epoch seconds around it."""
    with open(log_path, "w") as log:
        start = time.time()
        rc = subprocess.run(
            cmd, check=False, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT
        ).returncode
        end = time.time()
    if rc != 0:
        sys.exit(f"{shlex.join(cmd)} exited with {rc}; its output is in {log_path}")
    return start, end


def measure(storage: Path, start: float, end: float) -> dict:
    records = sorted(
        (json.loads(p.read_text()) for p in (storage / "records").glob("*.json")), key=lambda r: r["finished_at"]
    )
    done = np.array([r["finished_at"] for r in records])
    total = np.array([r["timings"]["total"] for r in records])
    trip = np.array([r["timings"]["round_trip"] for r in records])
    first_submitted = done[0] - trip[0]  # finished_at is stamped right after the round trip ends
    return {
        "scores": {r["key"]: r["score"] for r in records},
        # by position: keys hold the models' absolute paths, which differ between checkouts
        "scores_in_order": [r["score"] for r in sorted(records, key=lambda r: (r["generation"], r["index"]))],
        "failed": sum(r["status"] != "ok" for r in records),
        "wall": end - start,
        "startup": first_submitted - start,  # process start -> first candidate submitted
        "steady": done[-1] - first_submitted,  # first submitted -> last recorded
        "shutdown": end - done[-1],  # last recorded -> process exit (server/Ray stop)
        "slot": total.mean(),
        "trip": trip.mean(),
        "orch": (trip - total).mean(),
        "gap": np.diff(done).mean() if len(done) > 1 else float("nan"),
    }


# The pipeline's start-up milestones, as the CLI logs them (HH:MM:SS.mmm | LEVEL | source - text).
MILESTONES = [
    ("options, config, models, storage path checked", "start-up: options, config, models and storage path checked"),
    ("task names checked (server launched)", "start-up: task names checked"),
    ("Ray started", "start-up: Ray started"),
    ("slot actors launched", "start-up: slots launched"),
    ("flow module imported", "start-up: flow imported"),
    ("Prefect server ready", "start-up: Prefect server ready"),
    ("evolve flow started", "Beginning flow run 'evolve"),
    ("slots ready", "evaluation slots:"),
    ("first candidate started", "| evomerge - candidate 0.0 "),
    ("first candidate recorded", "recorded: "),
]


def milestones_from_log(log_path: Path, start: float) -> list[tuple[str, float | None]]:
    """Seconds from process start to each milestone's first log line."""
    seen: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        for label, marker in MILESTONES:
            if label in seen or marker not in line or " | " not in line:
                continue
            if label == "first candidate recorded" and "| evomerge - candidate " not in line:
                continue
            clock = datetime.strptime(line.split(" | ")[0], "%H:%M:%S.%f").time()
            stamp = datetime.combine(datetime.fromtimestamp(start).date(), clock).timestamp()
            seen[label] = stamp - start if stamp >= start else stamp + 86400 - start
    return [(label, seen.get(label)) for label, _ in MILESTONES]


def pipeline_command(python: str, storage: Path, cpu_slots: int, search: list[str]) -> list[str]:
    return [
        python, "-m", "evomerge.cli", CONFIG, "--storage-path", str(storage), "--task-search-path", TASKS,
        "--cpu-slots", str(cpu_slots), "--no-save-final-model", "--no-baselines", *search,
    ]  # fmt: skip


def compare_checkouts(other: Path, tmp: Path, search: list[str], args: argparse.Namespace) -> None:
    """The pipeline side of another checkout against this one, alternately (the machine's load
    drifts; alternating spreads it over both), and the medians."""
    sides = {"other": other, "this": ROOT}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name, root in sides.items():
            storage = tmp / f"{name}-{round_}"
            cmd = pipeline_command(str(root / ".venv/bin/python"), storage, args.cpu_slots, search)
            with open(tmp / f"{name}-{round_}.log", "w") as log:
                start = time.time()
                rc = subprocess.run(cmd, cwd=root, env=child_env(), stdout=log, stderr=subprocess.STDOUT).returncode
                end = time.time()
            if rc != 0:
                sys.exit(f"{shlex.join(cmd)} exited with {rc}; its output is in {tmp / f'{name}-{round_}.log'}")
            runs[name].append(measure(storage, start, end))
            print(f"[{name} round {round_}] start-up {runs[name][-1]['startup']:.1f} s", flush=True)
    same = all(r["scores_in_order"] == runs["this"][0]["scores_in_order"] for rs in runs.values() for r in rs)
    print(f"\nsame scores, candidate by candidate, in every run: {'yes' if same else 'no'}")
    print(
        f"\n| {args.max_fevals} evaluations, {args.cpu_slots} slot(s), medians of {args.rounds} | {other} | this "
        "checkout | other / this |"
    )
    print("|---|---:|---:|---:|")
    for label, key in [
        ("start-up to the first candidate submitted", "startup"),
        ("per candidate, slot time", "slot"),
        ("per candidate, orchestration", "orch"),
        ("per candidate, between results", "gap"),
        ("wall time", "wall"),
    ]:
        a, b = (float(np.median([r[key] for r in runs[n]])) for n in ("other", "this"))
        print(f"| {label} | {a:.2f} s | {b:.2f} s | {a / b:.2f} |")
    print(f"command: cd {ROOT} && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {shlex.join([sys.executable, *sys.argv])}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-fevals", type=int, default=20)
    parser.add_argument("--popsize", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-slots", type=int, default=1, help="slots of the pipeline (the bare loop has one, in-process)"
    )
    parser.add_argument(
        "--compare-checkout",
        metavar="DIR",
        help="instead: the pipeline of another checkout (with its own .venv, e.g. the previous release) "
        "against this one's, alternately, --rounds times each; prints medians and ratios",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (records, logs)")
    parser.add_argument("--bare", metavar="STORAGE", help=argparse.SUPPRESS)  # the child of side 1
    args = parser.parse_args()
    if args.bare:
        return bare_loop(args.bare, args.max_fevals, args.popsize, args.seed)
    if not (ROOT / "examples/tiny/models/rev_expert/model.safetensors").exists():
        sys.exit("build the models first: python examples/tiny/make_models.py --out examples/tiny/models")

    tmp = Path(tempfile.mkdtemp(prefix="orch-overhead-"))
    search = ["--max-fevals", str(args.max_fevals), "--popsize", str(args.popsize), "--seed", str(args.seed)]
    if args.compare_checkout:
        return compare_checkouts(Path(args.compare_checkout).resolve(), tmp, search, args)
    bare_cmd = [sys.executable, str(Path(__file__).resolve()), "--bare", str(tmp / "bare"), *search]
    cli_cmd = pipeline_command(sys.executable, tmp / "pipeline", args.cpu_slots, search)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    results = {}
    for name, cmd in (("bare", bare_cmd), ("pipeline", cli_cmd)):
        print(f"[{name}] {shlex.join(cmd)}", flush=True)
        start, end = run_side(cmd, tmp / f"{name}.log")
        results[name] = measure(tmp / name, start, end)
        if name == "pipeline":
            results[name]["milestones"] = milestones_from_log(tmp / "pipeline.log", start)
        print(f"[{name}] done in {end - start:.1f} s", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())

    b, p = results["bare"], results["pipeline"]
    same = b["scores"] == p["scores"]
    print(
        f"\nsame candidates and scores: {'yes' if same else 'no'} "
        f"({len(b['scores'])} bare, {len(p['scores'])} pipeline records; "
        f"{b['failed']} and {p['failed']} failed)"
    )
    if not same:
        only = set(b["scores"]) ^ set(p["scores"])
        print(
            f"  keys in one side only: {len(only)}; "
            f"differing scores: {sum(b['scores'][k] != p['scores'][k] for k in set(b['scores']) & set(p['scores']))}"
        )
    rows = [
        ("wall time: process start -> exit", "wall"),
        ("  start-up: process start -> first candidate submitted", "startup"),
        ("  steady state: first submitted -> last recorded", "steady"),
        ("  shutdown: last recorded -> process exit", "shutdown"),
        ("per candidate, slot time (timings.total)", "slot"),
        ("per candidate, round trip (timings.round_trip)", "trip"),
        ("per candidate, orchestration (round_trip - total)", "orch"),
        ("per candidate, between consecutive finished_at", "gap"),
    ]
    print(
        f"\n| {args.max_fevals} evaluations, popsize {args.popsize}, seed {args.seed}, "
        f"{args.cpu_slots} pipeline slot(s), 1 thread per slot "
        "| bare loop (s) | pipeline (s) | pipeline / bare |"
    )
    print("|---|---:|---:|---:|")
    for label, key in rows:
        ratio = p[key] / b[key] if b[key] > 1e-3 else float("nan")
        print(f"| {label} | {b[key]:.2f} | {p[key]:.2f} | {ratio:.2f} |")
    print(
        f"\nratio pipeline/bare, total wall: {p['wall'] / b['wall']:.2f}; "
        f"steady-state per candidate (finished_at gap): {p['gap'] / b['gap']:.2f}"
    )
    print(
        f"fixed start-up cost of the pipeline: {p['startup'] - b['startup']:.1f} s "
        f"(start-up {p['startup']:.1f} s vs {b['startup']:.1f} s)"
    )
    print("\n| pipeline start-up milestone | seconds from process start | phase |")
    print("|---|---:|---:|")
    previous = 0.0
    for label, at in p["milestones"]:
        if at is None:
            print(f"| {label} | not in the log | |")
            continue
        print(f"| {label} | {at:.2f} | {at - previous:+.2f} |")
        previous = at
    print(
        f"extra per candidate in steady state: {p['gap'] - b['gap']:.2f} s; "
        f"shutdown extra: {p['shutdown'] - b['shutdown']:.1f} s"
    )
    print(f"load average after: {load}")
    print(f"command: cd {ROOT} && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {shlex.join([sys.executable, *sys.argv])}")
    if args.keep:
        print(f"records and logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
