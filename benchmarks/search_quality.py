"""Search quality side by side: evomerge, upstream ``mergekit-evolve`` and random search on
planted-optimum problems, at equal numbers of evaluations.

    python benchmarks/search_quality.py                       # everything (about 2 hours here)
    python benchmarks/search_quality.py --systems evomerge random --problems linear-2 --seeds 0 1

Run from the repository root with evomerge's environment. The problems
(``benchmarks/planted/problems.py``) are merges of broken copies of a tiny random model, scored by
a real lm-eval task on which the model itself, and so the restoring recipe, scores exactly 1.0.
Every system gets the same ``mergekit-evolve`` config, unchanged:

- ``evomerge``: its search loop (``run_search_loop``) with its defaults, in this process pool,
  merges in memory, lm-eval's HF model (Prefect and Ray add nothing to what is searched);
- ``evomerge-mirrored-elitist``: the same with ``--searcher cma-es-box-mirrored-elitist``;
- ``evomerge-cma-es``: the same with ``--searcher cma-es``, 0.2's default (unbounded CMA-ES,
  sigma0 1/6, as upstream);
- ``random``: the same loop with ``--searcher random``;
- ``evomerge-barrier-free-4`` and ``-8``: the default searcher without the generation barrier,
  told results in the order 4 (8) slots would return them (durations lognormal, sigma 0.25, on a
  simulated clock; seeded), an idle slot taking a vector drawn ahead: the search loop with
  ``--barrier-free`` and a stream runner whose slots are simulated (each candidate is scored
  when a slot takes it; its result is delivered when its simulated duration has passed);
- ``evomerge-racing``: the default with ``--racing`` (each candidate scored in stages, stopped when
  the generation's candidates already scored beat it with confidence); a stopped candidate never
  counts as a best found, and the items it scored are counted (``--racing-table`` prints the
  items scored against scoring every item, and the quality against ``evomerge``);
  ``evomerge-racing-80`` the same at confidence 0.80;
- ``evomerge-racing-lockstep``: ``--racing`` with a slot per candidate, simulated: a generation's
  candidates raced in lockstep, each compared after every stage with all of the others
  (``benchmarks/lockstep_racing.py``);
- ``upstream``: ``mergekit-evolve`` of mergekit 0.1.4 in its own virtual environment, built on
  first use (``benchmarks/planted/upstream.py``), on a local Ray with one fake GPU.

Each search runs to the largest budget once; the best at a smaller budget is the best among its
first that many evaluations (a search does not know its budget). evomerge never scores a merge
twice, so its evaluations are distinct merges; upstream's and random's counts include repeats.
Printed per problem and budget: the uniform merge's score, and for each system the median and the
worst best score over the seeds and the median fraction of the uniform-to-optimum gap closed.
Results are kept per run under ``--results`` (a rerun only runs what is missing); ``--report``
prints from them without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "planted"))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import problems as planted  # noqa: E402

BUDGETS = (24, 48, 96)
# evomerge's options per system (everything else is evomerge's default).
SYSTEM_OPTIONS: dict[str, dict] = {
    "evomerge": {},  # the default: cma-es-box
    "evomerge-mirrored-elitist": {"searcher": "cma-es-box-mirrored-elitist"},
    "evomerge-cma-es": {"searcher": "cma-es"},  # 0.2's default (upstream's search, in evomerge)
    "random": {"searcher": "random"},
    "evomerge-barrier-free-4": {"barrier_free": True},
    "evomerge-barrier-free-8": {"barrier_free": True},
    "evomerge-racing": {"racing": True},
    "evomerge-racing-80": {"racing": True, "racing_confidence": 0.8},
    "evomerge-racing-lockstep": {"racing": True},
}
# Racing with a slot per candidate: a generation's candidates raced in lockstep (lockstep_racing.py).
LOCKSTEP = {"evomerge-racing-lockstep"}
# Barrier-free: slots simulated per system (the order results come back in).
BARRIER_FREE_SLOTS = {"evomerge-barrier-free-4": 4, "evomerge-barrier-free-8": 8}
SYSTEMS = (*SYSTEM_OPTIONS, "upstream")


# --- evomerge and random, in worker processes ------------------------------------------------------
_WORKERS: dict[str, object] = {}


def _worker(config: Path, root: Path):
    """One SlotWorker per problem and process: models loaded once, merges in memory."""
    from evomerge.backends.prepare import build_options, prepare_run
    from evomerge.backends.slot_worker import SlotWorker

    key = str(config)
    if key not in _WORKERS:
        import torch

        torch.set_num_threads(1)
        options = build_options(in_memory=True, task_search_path=[str(root / "tasks")], save_final_model=False)
        spec = prepare_run(str(config), tempfile.mkdtemp(prefix="quality-spec-"), options, check_task_names=False)
        _WORKERS[key] = SlotWorker(spec, "bench", threads=1)
    return _WORKERS[key]


def run_evomerge(job: tuple[str, str, int, int, str]) -> dict:
    """One search of ``system`` on ``problem``: every evaluation's score in the order asked."""
    from evomerge.backends.prepare import build_options, prepare_run
    from evomerge.search_loop import inline_runner, run_search_loop
    from evomerge.search_session import SearchSession

    system, problem, seed, budget, root = job
    config = Path(root) / "configs" / f"{problem}.yml"
    worker = _worker(config, Path(root))
    options = build_options(
        in_memory=True,
        seed=seed,
        max_fevals=budget,
        task_search_path=[str(Path(root) / "tasks")],
        save_final_model=False,
        baselines=False,
        **SYSTEM_OPTIONS[system],
    )
    spec = prepare_run(str(config), tempfile.mkdtemp(prefix=f"quality-{system}-"), options, check_task_names=False)
    session = SearchSession(spec)
    if spec.options.racing:  # the problem's worker serves every search: a fresh board for each search
        from evomerge.backends.race_board import RaceBoard
        from evomerge.backends.racer import Racer

        sys.path.insert(0, str(HERE))
        from lockstep_racing import LockstepBoard

        board = LockstepBoard() if system in LOCKSTEP else RaceBoard()
        worker.racer = Racer(spec, worker.evaluator, board)  # type: ignore[attr-defined]
    started = time.perf_counter()
    sigmas: list[float] = []

    class StepSizes:  # CMA-ES's step size after each generation (the search's own trace)
        def generation_done(self, generation: int, keys) -> None:
            sigmas.append(getattr(session.searcher, "sigma", float("nan")))

        def finish(self) -> None:
            pass

    submitted: list[str] = []  # keys in the order evaluations were started
    stream = _simulated_slots(worker.run, BARRIER_FREE_SLOTS.get(system, 1), seed, submitted)  # type: ignore[attr-defined]
    if system in LOCKSTEP:
        from lockstep_racing import lockstep_runner

        with lockstep_runner(worker, lambda request, outcome: session.record_outcome(request, outcome, 0.0)) as batch:
            run_search_loop(session, batch, [StepSizes()])
    else:
        run_search_loop(session, inline_runner(session, worker.run), [StepSizes()], run_stream=stream)  # type: ignore[attr-defined]
    if not submitted:  # synchronous: evaluated in the order asked
        submitted = [r.key for r in sorted(session.records.values(), key=lambda r: (r.generation, r.index))]
    records = [session.records[k] for k in submitted]
    session.close()
    if spec.options.racing:
        worker.racer = None  # type: ignore[attr-defined]
    return {
        # What a user can get as the best: candidates scored on every item.
        "scores": [r.score if r.status == "ok" and r.fully_scored else None for r in records],
        # Racing: items each evaluation scored, and what it would have scored on every item.
        "items": [[r.race.items_scored, r.race.items_full] if r.race else None for r in records],
        "sigmas": sigmas,
        "seconds": time.perf_counter() - started,
    }


def _simulated_slots(evaluate, slots: int, seed: int, submitted: list[str]):
    """``--barrier-free``'s stream runner with ``slots`` slots on a simulated clock: each
    candidate is scored when a slot takes it and its result delivered when its simulated duration
    (``slot_utilization.sample_durations``, seeded) has passed, so results arrive out of order."""
    import numpy as np

    from evomerge.backends.dispatch import dispatch_to_slots

    sys.path.insert(0, str(HERE))
    from slot_utilization import SimClock, sample_durations

    def run_stream(next_request, on_result) -> None:
        clock, rng, outcomes = SimClock(), np.random.default_rng([seed, 7]), {}

        def submit(request, slot):
            submitted.append(request.key)
            outcomes[request.key] = evaluate(request)
            return clock.submit(float(sample_durations(rng, 1)[0]), slot)

        def delivered(request, duration, seconds):
            return on_result(request, outcomes.pop(request.key), duration)

        dispatch_to_slots(next_request, list(range(slots)), submit, clock.wait_first, delivered, _raise)

    return run_stream


def _raise(request, exc: Exception):
    raise exc


def reference_scores(job: tuple[str, str]) -> dict:
    """The uniform merge's score and the restoring recipe's, through evomerge's evaluator."""
    problem_name, root = job
    problem = planted.BY_NAME[problem_name]
    worker = _worker(Path(root) / "configs" / f"{problem_name}.yml", Path(root))
    space = worker.spec.search_space()  # type: ignore[attr-defined]
    scores = {
        label: score_of(worker, x, label)
        for label, x in (("uniform", space.initial_point()), ("optimum", planted.optimum_vector(problem, space)))
    }
    return {"dimension": space.dimension, **scores}


def score_of(worker, x, label: str = "probe") -> float | None:
    """One vector of the problem's search space merged and scored by ``worker`` (a baseline
    request: nothing is told to a searcher); None if it failed."""
    from evomerge.core.records import CandidateRecord, CandidateRequest, candidate_key

    space = worker.spec.search_space()
    merge = space.decode(x)
    key = candidate_key(merge, worker.spec.evaluation)
    request = CandidateRequest(
        key=key,
        generation=-1,
        index=0,
        vector=[float(v) for v in x],
        merge_config=merge,
        kind="baseline",
        label=label,
        held_out=False,
        search_key=key,
    )
    outcome = worker.run(request)
    return CandidateRecord.from_outcome(request, outcome, worker.spec.evaluation.tasks, {}, 0.0, 0.0).score


# --- bookkeeping ---------------------------------------------------------------------------------
def best_within(scores: list[float | None], budget: int) -> float:
    done = [s for s in scores[:budget] if s is not None]
    return max(done) if done else float("nan")


def report(results: Path, problems: list[str], systems: list[str], seeds: list[int]) -> str:
    references = json.loads((results / "references.json").read_text())
    lines = [
        "| problem | dim | uniform | budget | "
        + " | ".join(f"{s}: median / worst / gap closed" for s in systems)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(systems),
    ]
    for problem in problems:
        ref = references[problem]
        for budget in BUDGETS:
            cells = []
            for system in systems:
                bests = []
                for seed in seeds:
                    path = results / system / problem / f"{seed}.json"
                    if path.exists():
                        bests.append(best_within(json.loads(path.read_text())["scores"], budget))
                if not bests:
                    cells.append("-")
                    continue
                median = statistics.median(bests)
                gap = (median - ref["uniform"]) / (ref["optimum"] - ref["uniform"])
                cells.append(
                    f"{median:.3f} / {min(bests):.3f} / {100 * gap:.0f}%"
                    + ("" if len(bests) == len(seeds) else f" ({len(bests)} seeds)")
                )
            lines.append(
                f"| {problem} | {ref['dimension']} | {ref['uniform']:.3f} | {budget} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


RACING_SYSTEMS = ("evomerge-racing", "evomerge-racing-80", "evomerge-racing-lockstep")


def racing_report(results: Path, problems: list[str], seeds: list[int], system: str = "evomerge-racing") -> str:
    """Racing (``system``) against scoring every item, the same candidate budget: items scored over a
    full evaluation's, and the best found, against the spread of the full evaluation's seeds."""
    lines = [
        f"{system}:",
        "",
        "| problem | budget | full: median best (SE) | racing: median best | within 1 SE | items ratio (median) |",
        "|---|---:|---:|---:|:---:|---:|",
    ]
    for problem in problems:
        runs = {
            system: [
                json.loads(path.read_text())
                for seed in seeds
                if (path := results / system / problem / f"{seed}.json").exists()
            ]
            for system in ("evomerge", system)
        }
        if not runs["evomerge"] or not runs[system]:
            continue
        for budget in BUDGETS:
            full = [best_within(r["scores"], budget) for r in runs["evomerge"]]
            raced = [best_within(r["scores"], budget) for r in runs[system]]
            se = statistics.stdev(full) / len(full) ** 0.5 if len(full) > 1 else float("nan")
            ratios = [
                sum(i[0] for i in r["items"][:budget] if i) / sum(i[1] for i in r["items"][:budget] if i)
                for r in runs[system]
            ]
            within = statistics.median(raced) >= statistics.median(full) - (0.0 if math.isnan(se) else se)
            lines.append(
                f"| {problem} | {budget} | {statistics.median(full):.3f} ({se:.3f}) | {statistics.median(raced):.3f} "
                f"| {'yes' if within else 'no'} | {statistics.median(ratios):.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--problems", nargs="+", default=[p.name for p in planted.PROBLEMS], choices=list(planted.BY_NAME)
    )
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=2, help="processes for evomerge and random search")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(tempfile.gettempdir()) / "evomerge-planted",
        help="where the problems' models, tasks and configs are built",
    )
    parser.add_argument("--results", type=Path, default=Path("runs/search_quality"))
    parser.add_argument("--report", action="store_true", help="only print the table of the results kept")
    parser.add_argument(
        "--racing-table", action="store_true", help="also print racing against full evaluation (items, quality)"
    )
    args = parser.parse_args()
    budget = max(BUDGETS)
    results = args.results.resolve()
    root = args.root.resolve()
    if not args.report:
        planted.build(root)
        references_file = results / "references.json"
        references = json.loads(references_file.read_text()) if references_file.exists() else {}
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.workers) as pool:
            missing = [p for p in args.problems if p not in references]
            for problem, ref in zip(
                missing, pool.map(reference_scores, [(p, str(root)) for p in missing]), strict=True
            ):
                references[problem] = ref
                print(
                    f"{problem}: dimension {ref['dimension']}, uniform {ref['uniform']:.3f}, optimum {ref['optimum']:.3f}",
                    flush=True,
                )
            results.mkdir(parents=True, exist_ok=True)
            references_file.write_text(json.dumps(references, indent=1))
            jobs = [
                (system, problem, seed, budget, str(root))
                for problem in args.problems
                for seed in args.seeds
                for system in args.systems
                if system != "upstream" and not (results / system / problem / f"{seed}.json").exists()
            ]
            pending = pool.imap_unordered(_run_and_keep, [(job, str(results)) for job in jobs])
            if "upstream" in args.systems:
                _run_upstream(args.problems, args.seeds, root, results, budget)
            for line in pending:
                print(line, flush=True)
    print(report(results, args.problems, args.systems, args.seeds))
    if args.racing_table:
        for system in RACING_SYSTEMS:
            if (results / system).is_dir():
                print(racing_report(results, args.problems, args.seeds, system))


def _run_and_keep(item: tuple[tuple[str, str, int, int, str], str]) -> str:
    job, results = item
    system, problem, seed, _, _ = job
    outcome = run_evomerge(job)
    path = Path(results) / system / problem / f"{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outcome))
    return (
        f"{system} {problem} seed {seed}: best {best_within(outcome['scores'], 96):.3f} in {outcome['seconds']:.0f} s"
    )


def _run_upstream(problems: list[str], seeds: list[int], root: Path, results: Path, budget: int) -> None:
    import upstream

    python = upstream.ensure_venv()
    for problem in problems:
        for seed in seeds:
            path = results / "upstream" / problem / f"{seed}.json"
            if path.exists():
                continue
            workdir = Path(tempfile.mkdtemp(prefix=f"upstream-{problem}-{seed}-"))
            started = time.perf_counter()
            upstream.run(
                python,
                root / "configs" / f"{problem}.yml",
                workdir,
                budget,
                seed,
                root / "tasks",
                log=workdir / "log.txt",
            )
            scores = upstream.scores(workdir)
            fit = workdir / "outcmaes" / "fit.dat"
            outcome = {
                "scores": scores,
                "sigmas": upstream.sigmas(fit),
                "fit_dat_best": upstream.best_at(fit, list(BUDGETS)),
                "seconds": time.perf_counter() - started,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(outcome))
            print(
                f"upstream {problem} seed {seed}: best {best_within(scores, budget):.3f} in {outcome['seconds']:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
