"""What a run shows about itself (pure): the candidate table of a generation, the best
configuration as markdown, a progress line, and the best candidates against the baselines. The Prefect publisher and the terminal both
take their text from here, so the UI and the files never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.core.config import EvolveConfig, TaskConfiguration
from evomerge.core.records import CandidateRecord
from evomerge.core.references import PARENT_PREFIX, paired_difference, top_candidates


def candidate_rows(records: Iterable[CandidateRecord], tasks: Sequence[TaskConfiguration]) -> list[dict[str, Any]]:
    """One row per candidate, in the order asked: parameters, per-task metrics, fitness, slot.
    Only tasks that some record was scored on get a column."""
    records = sorted(records, key=lambda r: (r.generation, r.index))
    tasks = [t for t in tasks if any(t.name in r.metrics for r in records)]
    rows = []
    for r in records:
        name = r.label or f"{r.generation}.{r.index}"
        row: dict[str, Any] = {
            "candidate": f"{name} (held out)" if r.held_out else name,
            "key": r.key,
            "status": r.status,
        }
        row["fitness"] = None if r.score is None else round(r.score, 6)
        for task in tasks:
            value = r.metrics.get(task.name, {}).get(task.metric)
            row[f"{task.name} {task.metric}"] = None if value is None else round(value, 6)
        row.update({name: round(value, 4) for name, value in r.parameters.items()})
        row["slot"] = f"{r.slot}@{r.node}" if r.node else r.slot
        row["seconds"] = round(r.timings.round_trip or r.timings.total, 2)
        row["error"] = r.error or ""
        rows.append(row)
    return rows


def generation_stats(
    records: Iterable[CandidateRecord],
    tasks: Sequence[TaskConfiguration],
    best: CandidateRecord | None,
    evaluations: int,
) -> dict[str, float | int]:
    """Per-generation numbers for a metrics logger: fitness mean/max/min, per-task mean/max,
    failures, the run's best so far and evaluations spent."""
    records = list(records)
    ok = [r for r in records if r.status == "ok" and r.score is not None]
    stats: dict[str, float | int] = {
        "evaluations": evaluations,
        "candidates": len(records),
        "failed": len(records) - len(ok),
    }
    if ok:
        scores = [r.score for r in ok if r.score is not None]  # every record of ok; the check only narrows the type
        stats.update(
            {"fitness/mean": sum(scores) / len(scores), "fitness/max": max(scores), "fitness/min": min(scores)}
        )
        for task in tasks:
            values = [v for r in ok if (v := r.metrics.get(task.name, {}).get(task.metric)) is not None]
            if values:
                stats[f"{task.name}/{task.metric}/mean"] = sum(values) / len(values)
                stats[f"{task.name}/{task.metric}/max"] = max(values)
    if best is not None and best.score is not None:
        stats["best/fitness"] = best.score
    return stats


def best_config_markdown(record: CandidateRecord | None, config_yaml: str, evaluations: int, max_fevals: int) -> str:
    """``config_yaml``: the record's merge configuration as YAML (rendered by a backend)."""
    if record is None:
        return f"# Best merge so far\n\nNo candidate has succeeded yet ({evaluations} of {max_fevals} evaluations spent).\n"
    metrics = "\n".join(
        f"| {task} | {metric} | {value} |"
        for task, values in sorted(record.metrics.items())
        for metric, value in sorted(values.items())
    )
    return (
        f"# Best merge so far: fitness {record.score:.6f}\n\n"
        f"Candidate {record.generation}.{record.index} (key `{record.key}`), "
        f"after {evaluations} of {max_fevals} evaluations.\n\n"
        f"| task | metric | value |\n|---|---|---|\n{metrics}\n\n"
        f"Merge it with `mergekit-yaml best_config.yaml OUTPUT_FOLDER`:\n\n```yaml\n{config_yaml}```\n"
    )


def progress_percent(evaluations: int, max_fevals: int) -> float:
    return 100.0 * min(evaluations, max_fevals) / max(1, max_fevals)


def progress_line(
    generation: int,
    evaluations: int,
    max_fevals: int,
    best: float | None,
    elapsed: float,
    mean: float | None = None,
    seconds_left: float | None = None,
    slot_utilization: float | None = None,
) -> str:
    """``generation 3: 40/100 evaluations, best 1.8200, mean 1.6123, slots 81% busy, 52 s
    elapsed, ~78 s left``."""
    parts = [
        f"generation {generation}: {evaluations}/{max_fevals} evaluations",
        f"best fitness {'none' if best is None else f'{best:.4f}'}",
    ]
    if mean is not None:
        parts.append(f"generation mean {mean:.4f}")
    if slot_utilization is not None:
        parts.append(f"slots {slot_utilization:.0%} busy")
    parts.append(f"{elapsed:.0f} s elapsed")
    if seconds_left is not None:
        parts.append(f"~{seconds_left:.0f} s left")
    return ", ".join(parts)


# --- the search against its baselines ---------------------------------------------------------


@dataclass(frozen=True)
class ComparisonRow:
    """One model of the comparison: an evolved candidate or a baseline, with its search-task
    score and, where it was scored on them, its held-out score."""

    label: str
    key: str
    search_score: float | None
    search_metrics: dict[str, float | None]
    held_out_score: float | None = None
    held_out_metrics: dict[str, float | None] = field(default_factory=dict)
    held_out_items: dict[str, list[float]] = field(default_factory=dict)

    @property
    def is_evolved(self) -> bool:
        return self.label.startswith(EVOLVED_PREFIX)


EVOLVED_PREFIX = "evolved"


def comparison_rows(
    top: Sequence[CandidateRecord],
    baselines: Mapping[str, CandidateRecord],
    held_out: Mapping[str, CandidateRecord],
    tasks: Sequence[TaskConfiguration],
    held_out_tasks: Sequence[TaskConfiguration] | None,
) -> list[ComparisonRow]:
    """The best candidates (best first), then the baselines in the order they were asked."""
    by_search_key = {r.search_key: r for r in held_out.values() if r.status == "ok"}

    def row(label: str, record: CandidateRecord) -> ComparisonRow:
        scored = by_search_key.get(record.key)
        return ComparisonRow(
            label=label,
            key=record.key,
            search_score=record.score if record.status == "ok" else None,
            search_metrics=_task_values(record, tasks),
            held_out_score=scored.score if scored else None,
            held_out_metrics=_task_values(scored, held_out_tasks or []) if scored else {},
            held_out_items=dict(scored.item_scores) if scored else {},
        )

    rows = [row(EVOLVED_PREFIX + (" (best)" if i == 0 else f" #{i + 1}"), r) for i, r in enumerate(top)]
    ordered = sorted((r for r in baselines.values() if not r.held_out), key=lambda r: r.index)
    rows += [row(r.label, r) for r in ordered]
    return rows


def comparison_for(
    records: Mapping[str, CandidateRecord],
    baselines: Mapping[str, CandidateRecord],
    held_out: Mapping[str, CandidateRecord],
    config: EvolveConfig,
    top: int,
) -> list[ComparisonRow]:
    """The comparison of a search: its ``top`` best candidates and its baselines (``config``:
    for the tasks and held-out tasks)."""
    return comparison_rows(
        top_candidates(records, max(1, top)), baselines, held_out, config.tasks, config.held_out_tasks
    )


def _task_values(record: CandidateRecord, tasks: Sequence[TaskConfiguration]) -> dict[str, float | None]:
    return {f"{t.name} {t.metric}": record.metrics.get(t.name, {}).get(t.metric) for t in tasks}


def comparison_summary(
    rows: Sequence[ComparisonRow], held_out_tasks: Sequence[TaskConfiguration] | None
) -> dict[str, Any]:
    """For summary.json: each row's scores, the gain over the best parent on the search's tasks
    and, on held-out tasks, the best candidate against every baseline (paired over items)."""
    evolved = next((r for r in rows if r.is_evolved), None)
    parents = [(r.search_score, r) for r in rows if r.label.startswith(PARENT_PREFIX) and r.search_score is not None]
    best_parent_score, best_parent = max(parents, key=lambda pair: pair[0], default=(None, None))
    out: dict[str, Any] = {
        "models": [
            {
                "label": r.label,
                "key": r.key,
                "fitness": r.search_score,
                "metrics": r.search_metrics,
                "held_out_fitness": r.held_out_score,
                "held_out_metrics": r.held_out_metrics or None,
            }
            for r in rows
        ],
        "best_parent": best_parent.label if best_parent else None,
        "gain_over_best_parent": (
            evolved.search_score - best_parent_score
            if evolved and best_parent_score is not None and evolved.search_score is not None
            else None
        ),
        "held_out_vs_baselines": {},
    }
    if evolved and evolved.held_out_items and held_out_tasks:
        for r in rows:
            if r.is_evolved or not r.held_out_items:
                continue
            d = paired_difference(evolved.held_out_items, r.held_out_items, held_out_tasks)
            out["held_out_vs_baselines"][r.label] = {
                "difference": d.difference,
                "standard_error": d.standard_error,
                "standard_errors": d.z,
                "items": d.items,
            }
    # The comparison a user cares about most: against the baseline the best candidate beat by
    # the least (with --fixed-baselines, usually the best hand-picked setting).
    differences = out["held_out_vs_baselines"]
    out["closest_baseline_held_out"] = min(
        differences, key=lambda label: differences[label]["difference"], default=None
    )
    return out


def comparison_markdown(
    rows: Sequence[ComparisonRow],
    tasks: Sequence[TaskConfiguration],
    held_out_tasks: Sequence[TaskConfiguration] | None,
) -> str:
    """The per-task table of the best candidates against the baselines, and the gains."""
    if not rows:
        return "# Evolved merge against its baselines\n\nNothing scored yet.\n"
    summary = comparison_summary(rows, held_out_tasks)
    columns = [f"{t.name} {t.metric}" for t in tasks]
    header = ["model", *columns, "fitness"]
    held_columns = [f"{t.name} {t.metric}" for t in held_out_tasks or []]
    if held_columns:
        header += [f"held out: {c}" for c in held_columns] + ["held-out fitness"]
    lines = [
        "# Evolved merge against its baselines",
        "",
        "Fitness on the search's tasks"
        + (" and on the held-out tasks (never seen by the search)" if held_columns else "")
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        cells = [r.label, *(_fmt(r.search_metrics.get(c)) for c in columns), _fmt(r.search_score)]
        if held_columns:
            cells += [*(_fmt(r.held_out_metrics.get(c)) for c in held_columns), _fmt(r.held_out_score)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if summary["gain_over_best_parent"] is not None:
        lines.append(
            f"Gain of the best candidate over the best parent ({summary['best_parent']}) on the "
            f"search's tasks: {summary['gain_over_best_parent']:+.4f} (selected on these "
            "tasks, so optimistic)."
        )
    closest = summary["closest_baseline_held_out"]
    if closest is not None:
        d = summary["held_out_vs_baselines"][closest]
        lines.append(
            f"Held out, the best candidate against its closest baseline ({closest}): {d['difference']:+.4f} "
            f"({d['standard_errors']:.1f} paired standard errors); against each baseline:"
        )
    for label, d in summary["held_out_vs_baselines"].items():
        lines.append(
            f"- held out, best candidate - {label}: {d['difference']:+.4f} "
            f"(paired standard error {d['standard_error']:.4f}, {d['standard_errors']:.1f} SE, "
            f"{d['items']} items)"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
