"""The fitness-over-evaluations plot (PNG bytes), for ``evomerge report`` and the Prefect UI.

matplotlib's object API with the Agg canvas: no pyplot, so no global backend or figure state in
the evolve flow's process, and no display needed.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from itertools import pairwise

from evomerge.core.records import CandidateRecord


def fitness_plot_png(
    candidates: Iterable[CandidateRecord],
    baselines: Iterable[CandidateRecord] = (),
    title: str = "evomerge: fitness over evaluations",
) -> bytes:
    """Each candidate's fitness in the order asked (failed ones left out), the best so far, and
    each baseline scored on the search's tasks as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ordered = sorted(candidates, key=lambda r: (r.generation, r.index))
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs, ys, best_x, best_y = [], [], [], []
    best = None
    for n, record in enumerate(ordered, start=1):
        if record.status != "ok" or record.score is None:
            continue
        xs.append(n)
        ys.append(record.score)
        best = record.score if best is None else max(best, record.score)
        best_x.append(n)
        best_y.append(best)
    axes.scatter(xs, ys, s=14, color="0.55", label="candidate", zorder=2)
    if best_x:
        axes.step(best_x, best_y, where="post", color="tab:blue", linewidth=2, label="best so far", zorder=3)
    generation_starts = [n for n, (a, b) in enumerate(pairwise(ordered), start=1) if a.generation != b.generation]
    for n in generation_starts:
        axes.axvline(n + 0.5, color="0.9", linewidth=0.8, zorder=1)
    colors = ["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive"]
    shown = [b for b in baselines if not b.held_out and b.status == "ok" and b.score is not None]
    for i, record in enumerate(sorted(shown, key=lambda r: r.index)):
        axes.axhline(
            record.score,
            linestyle="--",
            linewidth=1.2,
            color=colors[i % len(colors)],
            label=f"{record.label} ({record.score:.3f})",
            zorder=1,
        )
    axes.set_xlabel("evaluation (candidates in the order CMA-ES asked them; grey lines: generations)")
    axes.set_ylabel("fitness")
    axes.set_title(title)
    axes.grid(axis="y", color="0.92")
    if xs or shown:
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
