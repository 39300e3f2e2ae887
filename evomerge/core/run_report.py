"""What a run shows about itself (pure): the candidate table of a generation, the best
configuration as markdown, and a progress line. The Prefect publisher and the terminal both
take their text from here, so the UI and the files never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import yaml

from evomerge.core.config import TaskConfiguration
from evomerge.core.records import CandidateRecord


def candidate_rows(records: Iterable[CandidateRecord], tasks: Sequence[TaskConfiguration]) -> list[dict]:
    """One row per candidate, in the order asked: parameters, per-task metrics, fitness, slot."""
    rows = []
    for r in sorted(records, key=lambda r: (r.generation, r.index)):
        row: dict = {"candidate": f"{r.generation}.{r.index}", "key": r.key, "status": r.status}
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
    records: Iterable[CandidateRecord], tasks: Sequence[TaskConfiguration], best: CandidateRecord | None,
    evaluations: int,
) -> dict[str, float | int]:
    """Per-generation numbers for a metrics logger: fitness mean/max/min, per-task mean/max,
    failures, the run's best so far and evaluations spent."""
    records = list(records)
    ok = [r for r in records if r.status == "ok" and r.score is not None]
    stats: dict[str, float | int] = {"evaluations": evaluations, "candidates": len(records),
                                     "failed": len(records) - len(ok)}
    if ok:
        scores = [r.score for r in ok]
        stats.update({"fitness/mean": sum(scores) / len(scores), "fitness/max": max(scores),
                      "fitness/min": min(scores)})
        for task in tasks:
            values = [v for r in ok if (v := r.metrics.get(task.name, {}).get(task.metric)) is not None]
            if values:
                stats[f"{task.name}/{task.metric}/mean"] = sum(values) / len(values)
                stats[f"{task.name}/{task.metric}/max"] = max(values)
    if best is not None:
        stats["best/fitness"] = best.score
    return stats


def best_config_markdown(record: CandidateRecord | None, evaluations: int, max_fevals: int) -> str:
    if record is None:
        return f"# Best merge so far\n\nNo candidate has succeeded yet ({evaluations} of {max_fevals} evaluations spent).\n"
    metrics = "\n".join(
        f"| {task} | {metric} | {value} |"
        for task, values in sorted(record.metrics.items())
        for metric, value in sorted(values.items())
    )
    config = yaml.safe_dump(record.merge_config, sort_keys=False, default_flow_style=None)
    return (
        f"# Best merge so far: fitness {record.score:.6f}\n\n"
        f"Candidate {record.generation}.{record.index} (key `{record.key}`), "
        f"after {evaluations} of {max_fevals} evaluations.\n\n"
        f"| task | metric | value |\n|---|---|---|\n{metrics}\n\n"
        f"Merge it with `mergekit-yaml best_config.yaml OUTPUT_FOLDER`:\n\n```yaml\n{config}```\n"
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
) -> str:
    """``generation 3: 40/100 evaluations, best 1.8200, mean 1.6123, 52 s elapsed, ~78 s left``."""
    parts = [f"generation {generation}: {evaluations}/{max_fevals} evaluations",
             f"best fitness {'none' if best is None else f'{best:.4f}'}"]
    if mean is not None:
        parts.append(f"generation mean {mean:.4f}")
    parts.append(f"{elapsed:.0f} s elapsed")
    if seconds_left is not None:
        parts.append(f"~{seconds_left:.0f} s left")
    return ", ".join(parts)
