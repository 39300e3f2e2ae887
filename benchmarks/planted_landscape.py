"""How hard each planted problem is for a search that starts where evomerge's does: what share of
the first generation's distribution already lands near the optimum, and how sharply the score
falls off the optimum along each coordinate.

    python benchmarks/planted_landscape.py                        # the low-dimensional problems
    python benchmarks/planted_landscape.py --problems ties-3 --samples 400 --slices

Run from the repository root with evomerge's environment (the problems are built under
``/tmp/evomerge-planted`` as by ``search_quality.py``). For each problem it scores ``--samples``
vectors drawn as the default searcher's first generation draws them (``cma-es-box``: the uniform
start plus its default sigma0 times a standard normal, clipped into the box; seeded) and prints
the share that closes at least 10 % of the uniform-to-optimum gap (``better``: a direction for
the search to follow), the share that closes at least 95 % of it (``near``), and what that share
alone would give in 48 evaluations, 1 - (1 - near)^48: the chance that a search which learned
nothing would still have found such a merge. With ``--slices``, the score along each coordinate
through the optimum (the others held at it), at 0, 0.25, 0.5, 0.75 and 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import search_quality as quality  # noqa: E402

planted = quality.planted
NEAR = 0.95  # share of the gap a "near" merge closes: issue 11's target
BETTER = 0.10  # share of the gap a "better" merge closes
SLICE_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)


def landscape(problem_name: str, root: Path, samples: int, seed: int, slices: bool) -> dict:
    from evomerge.core.options import RunOptions

    problem = planted.BY_NAME[problem_name]
    worker = quality._worker(root / "configs" / f"{problem_name}.yml", root)
    space = worker.spec.search_space()
    start = space.initial_point()
    optimum = np.asarray(planted.optimum_vector(problem, space), dtype=float)
    uniform, best = quality.score_of(worker, start), quality.score_of(worker, optimum)
    # The default searcher's first generation: pycma samples its start with the identity
    # covariance and step size sigma0; the box searcher clips each sample into the box.
    sigma0 = RunOptions().sigma0
    lower, upper = (np.asarray(edge, dtype=float) for edge in space.box())
    rng = np.random.default_rng(seed)
    draws = np.clip(start + sigma0 * rng.standard_normal((samples, start.size)), lower, upper)
    scores = [quality.score_of(worker, x) for x in draws]

    def share(fraction: float) -> float:
        threshold = uniform + fraction * (best - uniform) - 1e-9
        return sum(s is not None and s >= threshold for s in scores) / samples

    near = share(NEAR)
    out = {
        "problem": problem_name,
        "dimension": space.dimension,
        "uniform": uniform,
        "optimum": best,
        "better": share(BETTER),
        "near": near,
        "median": float(np.median([s for s in scores if s is not None])),
        "chance_in_48": 1 - (1 - near) ** 48,
        "slices": {},
    }
    if slices:
        for i, label in enumerate(space.labels()):
            row = []
            for value in SLICE_VALUES:
                x = optimum.copy()
                x[i] = value
                row.append(quality.score_of(worker, x))
            out["slices"][label] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    low = [p.name for p in planted.PROBLEMS if not p.high_dimensional]
    parser.add_argument("--problems", nargs="+", default=low, choices=list(planted.BY_NAME))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slices", action="store_true", help="also the score along each coordinate")
    parser.add_argument("--root", type=Path, default=Path("/tmp/evomerge-planted"))
    args = parser.parse_args()
    root = args.root.resolve()
    planted.build(root)
    print(
        f"| problem | dim | uniform | optimum | first-generation draws: median score | share better than "
        f"uniform (>= {BETTER:.0%} of the gap) | share near the optimum (>= {NEAR:.0%}) | chance in 48 draws |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results = [landscape(name, root, args.samples, args.seed, args.slices) for name in args.problems]
    for r in results:
        print(
            f"| {r['problem']} | {r['dimension']} | {r['uniform']:.2f} | {r['optimum']:.2f} | {r['median']:.2f} "
            f"| {r['better']:.3f} | {r['near']:.3f} | {r['chance_in_48']:.2f} |"
        )
    for r in results:
        if r["slices"]:
            print(f"\n{r['problem']}: score along each coordinate through the optimum")
            print("| coordinate | " + " | ".join(f"{v:g}" for v in SLICE_VALUES) + " |")
            print("|---|" + "---:|" * len(SLICE_VALUES))
            for label, row in r["slices"].items():
                print(f"| {label} | " + " | ".join("failed" if s is None else f"{s:.2f}" for s in row) + " |")


if __name__ == "__main__":
    main()
