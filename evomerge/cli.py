"""``evomerge [OPTIONS] --storage-path PATH CONFIG``: a ``mergekit-evolve`` command line works by
changing its first word.

Order of work: validate everything (config, options, models, task names) -> start a private
Prefect server unless PREFECT_API_URL is set -> run the ``evolve`` flow (which starts Ray) ->
stop what was started. Ctrl-C or SIGTERM stops within seconds; every record already written and
the best config stay; the same command continues the search.
"""

from __future__ import annotations

import os
import sys

import click

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _flag(name: str, default: bool, help: str, *aliases: str):
    """A ``--x/--no-x`` flag, as upstream declares its boolean options."""
    return click.option(f"--{name}/--no-{name}", *aliases, default=default, show_default=True, help=help)


@click.command("evomerge", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--storage-path", required=True, help="Where records, checkpoints and the best config go (folder or s3://).")
@click.option("--max-fevals", type=int, default=100, show_default=True, help="Evaluation budget.")
@_flag("vllm", False, "Score with lm-eval's vllm backend.")
@click.option("--strategy", "-s", type=click.Choice(["pool", "buffered", "serial"]), default="pool", show_default=True, help="Evaluation scheduling strategy.")
@_flag("in-memory", False, "Merge in memory into a resident model.")
@click.option("--num-gpus", type=int, default=None, help="GPU slots to use (default: every GPU of the cluster).")
@_flag("merge-cuda", True, "Merge on the GPU when there is one.")
@_flag("trust-remote-code", False, "Let transformers run code shipped with a model.")
@_flag("allow-crimes", False, "Let mergekit merge unlike architectures.")
@click.option("--seed", "--random-seed", "seed", type=int, default=0, show_default=True, help="Seed of the whole run.")
@click.option("--batch-size", type=int, default=None, help="lm-eval batch size.")
@click.option("--sigma0", type=float, default=1 / 6, show_default=True, help="Initial CMA-ES step size.")
@click.option("--wandb/--no-wandb", "wandb", default=False, help="Log to Weights & Biases.")
@click.option("--wandb-project", default=None, help="Weights & Biases project.")
@click.option("--wandb-entity", default=None, help="Weights & Biases entity.")
@click.option("--task-search-path", multiple=True, help="Folder of lm-eval task YAMLs (repeatable).")
@click.option("--i-understand-the-depths-of-the-evils-i-am-unleashing", "allow_benchmark_tasks", is_flag=True, default=False, help="Allow public benchmarks as objectives.")
@_flag("save-final-model", True, "Merge the best config into STORAGE_PATH/final_model at the end.")
@_flag("reshard", True, "Accepted for compatibility; changes nothing (mergekit reads shards lazily).")
@click.option("--timeout", type=float, default=None, help="Wall-time budget in seconds; no generation starts after it.")
@click.option("--load-in-8bit", is_flag=True, default=False, help="Not available yet.")
@click.option("--load-in-4bit", is_flag=True, default=False, help="Not available yet.")
@click.option("--popsize", "--force-population-size", "popsize", type=int, default=None, help="CMA-ES population size.")
@click.option("--ray-address", default=None, help="Existing Ray cluster (default: a private local one).")
@click.option("--cpu-slots", type=int, default=None, help="Evaluation slots without GPUs (default: one per CPU).")
@click.option("--max-failed-fraction", type=float, default=0.5, show_default=True, help="Stop when more of a generation fails.")
@click.option("--slot-start-timeout", type=float, default=600.0, show_default=True, help="Seconds Ray may take to place and start the slots.")
@click.option("--candidate-timeout", type=float, default=3600.0, show_default=True, help="Seconds a candidate may take before it is failed and its worker restarted.")
@click.option("--generations-per-run", type=int, default=None, help="Stop cleanly after this many generations; the same command continues.")
@click.option("--worker-retries", type=int, default=2, show_default=True, help="Retries of a candidate whose worker process died.")
@_flag("baselines", True, "Score each parent and the uniform merge before the search (not counted in --max-fevals).")
@click.option("--held-out-top", type=int, default=3, show_default=True, help="With held_out_tasks: how many of the best candidates are scored on them at the end.")
def main(config: str, storage_path: str, **values) -> None:
    """Search the best merge of the models in CONFIG (a mergekit-evolve YAML file)."""
    from evomerge.backends.prepare import ConfigurationError, build_options, prepare_run
    from evomerge.backends.run_lease import LeaseHeldError, RunLease
    from evomerge.backends.run_store import RunStore, StorageError
    from evomerge.core.checkpoint import CorruptStateError
    from evomerge import stop_request
    from evomerge.search_session import RunStoppedError, StorageMismatchError, check_storage_path

    values["task_search_path"] = list(values["task_search_path"])
    try:
        options = build_options(**values)
        spec = prepare_run(config, storage_path, options)
        check_storage_path(spec)
        RunLease(RunStore(spec.storage_path)).check_free()
    except (ConfigurationError, StorageMismatchError, LeaseHeldError) as exc:
        click.echo(f"evomerge: error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)

    server = None
    stop_request.install()
    _show_library_logs()
    try:
        if not os.environ.get("PREFECT_API_URL"):
            from evomerge.backends.prefect_server import start_prefect_server

            click.echo("evomerge: starting a private Prefect server on 127.0.0.1 ...")
            server = start_prefect_server()
            os.environ["PREFECT_API_URL"] = server.api_url
            click.echo(f"evomerge: Prefect UI at {server.ui_url} (open while the run lasts)")
        else:
            click.echo(f"evomerge: using the Prefect server at {os.environ['PREFECT_API_URL']}")
        summary = _run(os.path.abspath(config), spec)
    except KeyboardInterrupt:
        _report_interrupted(spec.storage_path)
    except (RunStoppedError, StorageMismatchError, ConfigurationError, LeaseHeldError,
            StorageError, CorruptStateError) as exc:
        if stop_request.requested():
            _report_interrupted(spec.storage_path)
        click.echo(f"evomerge: error: {exc}", err=True)
        sys.exit(1)
    except Exception:
        # A library may turn the KeyboardInterrupt into its own error; a stop was still asked for.
        if stop_request.requested():
            _report_interrupted(spec.storage_path)
        raise
    finally:
        if server is not None:
            _flush_prefect_logs()
            server.stop()
    _print_summary(summary)


def _run(config_path: str, spec):
    # Imported only now: Prefect reads PREFECT_API_URL when it is first imported and configured.
    # The flow validates again, as a deployment run would; it runs in this directory, so
    # relative model paths resolve the same way.
    from flows.evolve import evolve

    return evolve(config=config_path, storage_path=spec.storage_path, **spec.options.model_dump())


def _show_library_logs() -> None:
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | evomerge - %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("evomerge")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _flush_prefect_logs() -> None:
    """Send buffered run logs to the server before it stops (else they are lost, noisily)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception as exc:  # never let log shipping hide the run's own outcome
        click.echo(f"evomerge: could not flush logs to the Prefect server ({exc})", err=True)


def _report_interrupted(storage_path: str) -> None:
    click.echo(
        f"\nevomerge: stopped. Records and best_config.yaml are kept in {storage_path}; "
        "run the same command again to continue.",
        err=True,
    )
    sys.exit(EXIT_INTERRUPTED)


def _print_summary(summary: dict) -> None:
    path = summary["storage_path"]
    click.echo("")
    state = "paused" if summary.get("paused") else "done"
    click.echo(f"evomerge: {state} ({summary.get('finished_reason')})")
    click.echo(f"  evaluations spent : {summary['evaluations']} of {summary['max_fevals']}"
               f" ({summary['failed_evaluations']} failed)")
    click.echo(f"  generations       : {summary['generations']}")
    best = summary.get("best_fitness")
    click.echo(f"  best fitness      : {best:.6f}" if best is not None else "  best fitness      : none")
    if summary.get("best_metrics"):
        for task, metrics in summary["best_metrics"].items():
            for metric, value in metrics.items():
                click.echo(f"    {task} {metric}: {value}")
    comparison = summary.get("comparison") or {}
    if comparison.get("gain_over_best_parent") is not None:
        click.echo(f"  over best parent  : {comparison['gain_over_best_parent']:+.6f} "
                   f"({comparison['best_parent']}; on the search's tasks)")
    for label, d in (comparison.get("held_out_vs_baselines") or {}).items():
        click.echo(f"  held out vs {label}: {d['difference']:+.4f} +- {d['standard_error']:.4f} "
                   f"({d['standard_errors']:.1f} SE)")
    click.echo(f"  best config       : {path}/best_config.yaml")
    click.echo(f"  summary           : {path}/summary.json")
    click.echo(f"  report            : evomerge report {path}")


def entry() -> None:
    """The ``evomerge`` command: ``evomerge CONFIG --storage-path ...`` (mergekit-evolve's
    command line) searches; ``evomerge report STORAGE_PATH`` reports on a search."""
    if sys.argv[1:2] == ["report"] and not os.path.isfile("report"):
        from evomerge.report import report

        report.main(sys.argv[2:], prog_name="evomerge report")
    else:
        main()


if __name__ == "__main__":
    entry()
