"""Slot utilization with and without the generation barrier, on a simulated clock.

    python benchmarks/slot_utilization.py                      # simulated evaluator, 8/16/32 slots
    python benchmarks/slot_utilization.py --searcher           # the real searcher, sync vs barrier-free
    python benchmarks/slot_utilization.py --records runs/demo  # a run's own round trips

``--searcher`` runs evomerge's CMA-ES (cma-es-box) through ``SuggestionFeed`` and the real
``dispatch_to_slots`` on the simulated clock, told a quadratic's value as each candidate finishes:
synchronous (a generation is asked when the last one is told) against barrier-free (an idle slot
takes a vector drawn ahead for the next generation), same durations model, same budget.

Utilization = busy slot-seconds / (slots x wall time). "With barrier" is what ``flows/evolve.py``
does (``pool`` strategy): each generation goes through the real ``dispatch_to_slots``, the next
only when its last candidate is back, so slots sit idle at the generation boundary. "No barrier" streams the
same candidates, in the same order, through the same slots in one ``dispatch_to_slots`` call: the
upper bound an asynchronous optimizer could reach. Ask/tell/checkpoint time is taken as zero here;
``--records`` shows what it costs in a real run.

Simulated durations: lognormal with the given mean (60 s) and sigma 0.25 of log-duration (a
spread of about 25%: decoding length varies with the merged model, page cache, GPU clocks),
times ``--straggler-factor`` (3) with probability ``--straggler-rate`` (2%): a cold model load,
a worker retry, a slow node. These are assumptions, not measurements: the tiny demo's 2-3 s round
trips (mostly fixed overhead) have a log-sigma of 0.31; vary --sigma and the straggler options.

With greedy dispatch (a free slot takes the next candidate at once) a slot is never idle while
a candidate waits, so all of a generation's idle time is at its end:
idle = slots x span - busy, and it is at most (slots - 1) x the generation's longest candidate.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from evomerge.backends.dispatch import dispatch_to_slots


class Span(NamedTuple):
    """One dispatch (a generation, or the whole barrier-free stream): its wall-clock interval and
    the slot-seconds its candidates took."""

    start: float
    end: float
    busy: float
    longest: float = 0.0


@dataclass(frozen=True)
class SimFuture:
    slot: Any
    start: float
    end: float
    seq: int  # submission order: ties on ``end`` resolve the same way every run

    def result(self) -> float:
        return self.end - self.start


class SimClock:
    """Simulated time for ``dispatch_to_slots``: ``submit`` starts a candidate (its duration) now,
    ``wait_first`` jumps the clock to the earliest finish."""

    def __init__(self, now: float = 0.0):
        self.now = now
        self.submitted = 0

    def submit(self, duration: float, slot: Any) -> SimFuture:
        self.submitted += 1
        return SimFuture(slot, self.now, self.now + duration, self.submitted)

    def wait_first(self, futures: list[SimFuture]) -> SimFuture:
        first = min(futures, key=lambda f: (f.end, f.seq))
        self.now = first.end
        return first


def _reraise(request: Any, exc: Exception) -> Any:
    raise exc


def dispatch(durations: list[float], slots: int, start: float = 0.0) -> Span:
    """Run ``durations`` through ``slots`` slots with the real dispatch, from time ``start``."""
    clock = SimClock(start)
    taken = dispatch_to_slots(
        list(durations),
        list(range(slots)),
        clock.submit,
        clock.wait_first,
        on_result=lambda request, outcome, seconds: outcome,
        on_error=_reraise,
    )
    return Span(start, clock.now, float(sum(taken)), float(max(taken, default=0.0)))


def with_barrier(generations: list[list[float]], slots: int) -> list[Span]:
    """One dispatch per generation, each starting when the previous one's last candidate ends."""
    spans, now = [], 0.0
    for durations in generations:
        spans.append(dispatch(durations, slots, now))
        now = spans[-1].end
    return spans


def without_barrier(generations: list[list[float]], slots: int) -> list[Span]:
    return [dispatch([d for g in generations for d in g], slots)]


def utilization(spans: list[Span], slots: int) -> float:
    wall = spans[-1].end - spans[0].start
    return sum(s.busy for s in spans) / (slots * wall)


def boundary_idle(span: Span, slots: int) -> float:
    """Idle slot-seconds of one generation: all at its end, since dispatch is greedy."""
    return slots * (span.end - span.start) - span.busy


def sample_durations(
    rng: np.random.Generator,
    n: int,
    mean: float = 60.0,
    sigma: float = 0.25,
    straggler_rate: float = 0.02,
    straggler_factor: float = 3.0,
) -> np.ndarray:
    # mu = ln(mean) - sigma^2 / 2 puts the lognormal's mean (not its median) at ``mean``.
    d = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)
    return np.where(rng.random(n) < straggler_rate, d * straggler_factor, d)


def cma_default_popsize(dimension: int) -> int:
    from evomerge.core.searcher import CmaEsSearcher

    return CmaEsSearcher(x0=[0.5] * dimension, sigma0=0.2, seed=0).popsize


def simulate_table(args: argparse.Namespace) -> None:
    default = cma_default_popsize(args.dimension)
    print(
        "| slots | popsize | util. with barrier | util. no barrier | barrier / no barrier | boundary idle"
        " per gen, mean (slot-s) | max (slot-s) | mean / mean duration | (slots-1) x longest, mean |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for slots in args.slots:
        sizes = [(default, f"{default} (CMA default, n={args.dimension})")] if default < slots else []
        sizes += [
            (slots, f"{slots} (= slots)"),
            (slots * 3 // 2, f"{slots * 3 // 2} (1.5x)"),
            (2 * slots, f"{2 * slots} (2x)"),
        ]
        for popsize, label in sizes:
            rng = np.random.default_rng([args.seed, slots, popsize])
            d = sample_durations(
                rng, args.generations * popsize, args.mean, args.sigma, args.straggler_rate, args.straggler_factor
            )
            gens = [list(g) for g in d.reshape(args.generations, popsize)]
            barrier, stream = with_barrier(gens, slots), without_barrier(gens, slots)
            idle = np.array([boundary_idle(s, slots) for s in barrier])
            bound = np.mean([(slots - 1) * s.longest for s in barrier])
            ub, us = utilization(barrier, slots), utilization(stream, slots)
            print(
                f"| {slots} | {label} | {ub:.1%} | {us:.1%} | {ub / us:.3f} | {idle.mean():.0f} "
                f"| {idle.max():.0f} | {idle.mean() / args.mean:.1f} | {bound:.0f} |"
            )


def searcher_utilization(args: argparse.Namespace, slots: int, popsize: int, barrier_free: bool) -> float:
    """The real searcher, feed and dispatcher on the simulated clock: busy / (slots x wall)."""
    from evomerge.core.searcher import CmaEsSearcher
    from evomerge.core.suggestion_feed import SuggestionFeed

    dim = args.dimension
    searcher = CmaEsSearcher(np.full(dim, 0.5), 0.5, args.seed, popsize, box=(np.zeros(dim), np.ones(dim)))
    feed = SuggestionFeed(searcher, args.generations * popsize, barrier_free)
    rng, clock = np.random.default_rng([args.seed, slots, popsize]), SimClock()

    def duration() -> float:
        return float(sample_durations(rng, 1, args.mean, args.sigma, args.straggler_rate, args.straggler_factor)[0])

    def told(suggestion, seconds, _):
        feed.tell(suggestion.id, -float(((np.asarray(suggestion.vector) - 0.3) ** 2).sum()))
        return seconds

    taken = dispatch_to_slots(
        feed.next, list(range(slots)), lambda s, slot: clock.submit(duration(), slot), clock.wait_first, told, _reraise
    )
    return float(sum(taken)) / (slots * clock.now)


def searcher_table(args: argparse.Namespace) -> None:
    default = cma_default_popsize(args.dimension)
    print("| slots | popsize | synchronous | barrier-free | barrier-free / synchronous |")
    print("|---:|---|---:|---:|---:|")
    for slots in args.slots:
        for popsize, label in (
            (default, f"{default} (CMA default, n={args.dimension})"),
            (slots, f"{slots} (= slots)"),
        ):
            sync, free = (searcher_utilization(args, slots, popsize, b) for b in (False, True))
            print(f"| {slots} | {label} | {sync:.1%} | {free:.1%} | {free / sync:.2f} |")


def read_records(storage: str) -> tuple[int, list[list[float]], list[Span]]:
    """A run's slot count, its round trips per generation (in index order, the order dispatched)
    and each generation's actual Span from the record timestamps."""
    timed = [
        r
        for p in sorted(Path(storage, "records").glob("*.json"))
        if ((r := json.loads(p.read_text())).get("timings") or {}).get("round_trip") is not None
    ]
    if not timed:
        sys.exit(f"no records with timings.round_trip under {storage}/records")
    by_gen: dict[int, list[dict]] = defaultdict(list)
    for r in timed:
        by_gen[r["generation"]].append(r)
    gens, actual = [], []
    for g in sorted(by_gen):
        rs = sorted(by_gen[g], key=lambda r: r["index"])
        rt = [r["timings"]["round_trip"] for r in rs]
        gens.append(rt)
        # round_trip runs from submission to result, so finished_at - round_trip is the submission.
        actual.append(
            Span(
                min(r["finished_at"] - t for r, t in zip(rs, rt, strict=True)),
                max(r["finished_at"] for r in rs),
                sum(rt),
                max(rt),
            )
        )
    return len({r["slot"] for r in timed}), gens, actual


def records_report(storage: str) -> None:
    slots, gens, actual = read_records(storage)
    replay, stream = with_barrier(gens, slots), without_barrier(gens, slots)
    gaps = [b.start - a.end for a, b in pairwise(actual)]
    print(
        f"{sum(map(len, gens))} timed records under {storage}: {len(gens)} generations, "
        f"{slots} slots, round trip mean {np.mean([d for g in gens for d in g]):.2f} s\n"
    )
    print("| schedule | wall (s) | utilization | vs no barrier |")
    print("|---|---:|---:|---:|")
    us = utilization(stream, slots)
    for name, spans in (
        ("actual run (record timestamps)", actual),
        ("replayed, with barrier (zero ask/tell time)", replay),
        ("replayed, no barrier", stream),
    ):
        u = utilization(spans, slots)
        print(f"| {name} | {spans[-1].end - spans[0].start:.1f} | {u:.1%} | {u / us:.3f} |")
    idle = [boundary_idle(s, slots) for s in actual]
    print(
        f"\nactual idle at the generation boundary: mean {np.mean(idle):.2f}, max {np.max(idle):.2f} "
        f"slot-s per generation; time between generations (ask/tell/checkpoint, subflow start): "
        f"mean {np.mean(gaps or [0]):.2f} s, max {np.max(gaps or [0]):.2f} s (x {slots} slots idle)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--generations", type=int, default=20)
    p.add_argument(
        "--dimension",
        type=int,
        default=24,
        help="for CMA-ES's default popsize; 24 = 3 models x 4 layer groups x (weight, density)",
    )
    p.add_argument("--mean", type=float, default=60.0, help="mean candidate duration, s")
    p.add_argument("--sigma", type=float, default=0.25, help="sigma of log-duration")
    p.add_argument("--straggler-rate", type=float, default=0.02)
    p.add_argument("--straggler-factor", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", metavar="STORAGE_PATH", help="replay a run's records instead")
    p.add_argument("--searcher", action="store_true", help="the real searcher: synchronous vs barrier-free")
    args = p.parse_args(argv)
    if args.records:
        print(f"command: python benchmarks/slot_utilization.py --records {shlex.quote(args.records)}\n")
        records_report(args.records)
        return
    print(
        "command: python benchmarks/slot_utilization.py --slots "
        f"{' '.join(map(str, args.slots))} --generations {args.generations} --dimension {args.dimension} "
        f"--mean {args.mean:g} --sigma {args.sigma:g} --straggler-rate {args.straggler_rate:g} "
        f"--straggler-factor {args.straggler_factor:g} --seed {args.seed}{' --searcher' if args.searcher else ''}\n"
    )
    (searcher_table if args.searcher else simulate_table)(args)


if __name__ == "__main__":
    main()
