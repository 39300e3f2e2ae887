"""``evomerge report STORAGE_PATH``: what a search found, against what a user would pick by hand.

Reads only the storage path (JSON records, no pickle; local or ``s3://``) and writes next to them:

- ``report.png``: every candidate's fitness over the evaluations, the best so far, and each
  baseline (parents, uniform merge) as a line;
- ``report.md``: the per-task table of the best candidates against the baselines, the gain over
  the best parent on the search's tasks and, with held-out tasks, the best candidate against
  every baseline on them with paired standard errors.

It can run while a search is going on (it reads what is written) or long after it.
"""

from __future__ import annotations

import sys

import click

from evomerge.backends.prepare import normalize_storage_path
from evomerge.backends.report_plot import fitness_plot_png
from evomerge.backends.run_store import RunStore, StorageError
from evomerge.core.config import EvolveConfig
from evomerge.core.run_report import comparison_for, comparison_markdown
from evomerge.core.storage_layout import BASELINES, CANDIDATES, HELD_OUT, REPORT_MARKDOWN, REPORT_PLOT, RUN_MANIFEST


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("storage_path")
@click.option("--top", type=int, default=None, help="Best candidates in the table (default: the run's --held-out-top).")
def report(storage_path: str, top: int | None) -> None:
    """Write report.md and report.png for the search in STORAGE_PATH."""
    try:
        markdown = write_report(storage_path, top)
    except StorageError as exc:
        click.echo(f"evomerge report: error: {exc}", err=True)
        sys.exit(1)
    click.echo(markdown)


def write_report(storage_path: str, top: int | None = None) -> str:
    store = RunStore(normalize_storage_path(storage_path))
    manifest = store.read_json(RUN_MANIFEST)
    if manifest is None:
        raise StorageError(
            f"{store.path(RUN_MANIFEST)} does not exist: {storage_path} holds no evomerge search. "
            "Give the --storage-path of a run"
        )
    config = EvolveConfig.model_validate(manifest["config"])
    top = top or manifest.get("options", {}).get("held_out_top") or 3
    records = store.read_records(folder=CANDIDATES)
    baselines = store.read_records(folder=BASELINES)
    held_out = store.read_records(folder=HELD_OUT)
    rows = comparison_for(records, baselines, held_out, config, top)
    store.write_bytes(REPORT_PLOT, fitness_plot_png(records.values(), baselines.values()))
    failed = sum(r.status == "failed" for r in records.values())
    markdown = (
        comparison_markdown(rows, config.tasks, config.held_out_tasks)
        + f"\n{len(records)} candidates evaluated ({failed} failed). Fitness plot: "
        f"{store.path(REPORT_PLOT)}\n"
    )
    store.write_text(REPORT_MARKDOWN, markdown)
    return markdown
