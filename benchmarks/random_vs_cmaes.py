"""CMA-ES against random search with the same evaluation budget, scored on held-out tasks.

    python benchmarks/random_vs_cmaes.py [--config examples/multiskill/config.yml]
        [--task-search-path examples/multiskill/tasks] [--budget 96] [--seeds 0 1 2 3 4]
        [--popsize 8] [--sigma0 0.3] [--workers 2] [--methods cma-es random]

``--methods`` picks among ``METHODS`` (below): besides the two above, ``cma-es-box`` (the default
searcher) and ``cma-es-box-racing`` (the same with ``--racing``: the items each search scored,
against scoring every candidate on every item, are printed too).

Run from the repository root. Both methods search the config's space with the same evaluation
code and budget, in plain processes (no Prefect, no Ray; one torch thread each):

- CMA-ES (``--searcher cma-es``) and random search (``--searcher random``: vectors drawn
  uniformly from [0, 1] per coordinate, every weight, density or t between 0 and 1, the box a
  user would try by hand), both through evomerge's own search loop (``run_search_loop``, the one
  the evolve flow runs) with the same decode and evaluation.

Each run's best candidate (by the search's fitness, the validation tasks) is then scored on the
config's ``held_out_tasks`` (never seen by either search). Candidates are merged in memory into a
resident model (``--in-memory``; identical to mergekit's on-disk merge for task_arithmetic).
Printed: per seed and method the best search fitness and its held-out fitness; per method the
mean and standard deviation over seeds, and the uniform merge's held-out fitness for reference.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval progress bars, per candidate

# Each method's options (everything else as the command line sets it).
METHODS: dict[str, dict] = {
    "cma-es": {"searcher": "cma-es"},
    "random": {"searcher": "random"},
    "cma-es-box": {"searcher": "cma-es-box"},
    "cma-es-box-racing": {"searcher": "cma-es-box", "racing": True},
}


def _worker_setup(config: str, task_paths: list[str], popsize: int, sigma0: float) -> None:
    import torch

    torch.set_num_threads(1)
    from evomerge.backends.prepare import build_options, prepare_run
    from evomerge.backends.slot_worker import SlotWorker

    global SPEC_ARGS, WORKER
    SPEC_ARGS = (config, task_paths, popsize, sigma0)
    options = build_options(
        in_memory=True,
        popsize=popsize,
        sigma0=sigma0,
        task_search_path=task_paths,
        save_final_model=False,
        baselines=False,
    )
    spec = prepare_run(config, tempfile.mkdtemp(prefix="bench-spec-"), options)
    WORKER = SlotWorker(spec, "bench", threads=1)


def run_one(job: tuple[str, int, int]) -> dict:
    """One search: ``(method, seed, budget)`` -> best search fitness, its held-out fitness, time."""
    from evomerge.backends.prepare import build_options, prepare_run
    from evomerge.search_loop import inline_runner, run_search_loop
    from evomerge.search_session import SearchSession

    method, seed, budget = job
    config, task_paths, popsize, sigma0 = SPEC_ARGS
    options = build_options(
        in_memory=True,
        popsize=popsize,
        sigma0=sigma0,
        seed=seed,
        max_fevals=budget,
        task_search_path=task_paths,
        save_final_model=False,
        baselines=False,
        held_out_top=1,
        **METHODS[method],
    )
    spec = prepare_run(config, tempfile.mkdtemp(prefix=f"bench-{method}-{seed}-"), options, check_task_names=False)
    session = SearchSession(spec)
    # One worker serves every search of this process: a racing search's racer gets a board of its own.
    from evomerge.backends.race_board import RaceBoard
    from evomerge.backends.racer import Racer

    WORKER.racer = Racer(spec, WORKER.evaluator, RaceBoard()) if spec.options.racing else None
    started = time.perf_counter()
    # The search's own loop; with held_out_tasks in the config it ends by scoring the best
    # candidate on them.
    run_search_loop(session, inline_runner(session, WORKER.run))
    seconds = time.perf_counter() - started
    best = session.best
    (held_out,) = [r for r in session.held_out.values() if r.search_key == best.key]
    summary = session.summary()
    return {
        "items_ratio": summary["items_scored"] / summary["items_full"] if summary["items_full"] else 1.0,
        "method": method,
        "seed": seed,
        "evaluations": session.evaluations,
        "search": best.score,
        "held_out": held_out.score,
        "seconds": seconds,
        "parameters": best.parameters,
    }


def uniform_held_out(_: int) -> float:
    from evomerge.backends.prepare import build_options, prepare_run
    from evomerge.core.references import baseline_requests
    from evomerge.search_session import SearchSession

    config, task_paths, popsize, sigma0 = SPEC_ARGS
    options = build_options(
        in_memory=True, popsize=popsize, sigma0=sigma0, task_search_path=task_paths, save_final_model=False
    )
    spec = prepare_run(config, tempfile.mkdtemp(prefix="bench-uniform-"), options, check_task_names=False)
    session = SearchSession(spec)
    requests = baseline_requests(session.space, session.settings, spec.held_out_evaluation, {})
    (uniform,) = [r for r in requests if r.held_out and r.label == "uniform merge"]
    return session.record_outcome(uniform, WORKER.run(uniform)).score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/multiskill/config.yml")
    parser.add_argument("--task-search-path", action="append", default=None)
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--popsize", type=int, default=8)
    parser.add_argument("--sigma0", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["cma-es", "random"], choices=list(METHODS))
    args = parser.parse_args()
    task_paths = args.task_search_path or ["examples/multiskill/tasks"]
    jobs = [(method, seed, args.budget) for seed in args.seeds for method in args.methods]
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(
        args.workers, initializer=_worker_setup, initargs=(args.config, task_paths, args.popsize, args.sigma0)
    ) as pool:
        uniform = pool.apply(uniform_held_out, (0,))
        results = pool.map(run_one, jobs, chunksize=1)
    print(
        f"config {args.config}, budget {args.budget} evaluations, popsize {args.popsize}, "
        f"sigma0 {args.sigma0}, seeds {args.seeds}; {time.perf_counter() - started:.0f} s wall, "
        f"{args.workers} worker processes"
    )
    print(f"uniform merge, held out: {uniform:.4f}")
    print(
        f"{'method':18s} {'seed':>4s} {'evals':>5s} {'best search':>11s} {'its held out':>12s} "
        f"{'items ratio':>11s} {'seconds':>8s}"
    )
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        print(
            f"{r['method']:18s} {r['seed']:4d} {r['evaluations']:5d} {r['search']:11.4f} "
            f"{r['held_out']:12.4f} {r['items_ratio']:11.3f} {r['seconds']:8.1f}"
        )
    for method in args.methods:
        held = np.array([r["held_out"] for r in results if r["method"] == method])
        search = np.array([r["search"] for r in results if r["method"] == method])
        items = np.array([r["items_ratio"] for r in results if r["method"] == method])
        sd = held.std(ddof=1) if held.size > 1 else 0
        print(
            f"{method:18s} held out: mean {held.mean():.4f}, sd {sd:.4f}, SE {sd / np.sqrt(held.size):.4f}, "
            f"min {held.min():.4f}, max {held.max():.4f}; best search fitness: mean {search.mean():.4f}; "
            f"items scored / full: mean {items.mean():.3f}"
        )


if __name__ == "__main__":
    main()
