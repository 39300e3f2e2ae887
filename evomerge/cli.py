"""``evomerge [OPTIONS] --storage-path PATH CONFIG``: a ``mergekit-evolve`` command line works by
changing its first word.

Order of work: validate everything (config, options, models, task names) -> launch a private
Prefect server unless PREFECT_API_URL is set, and while it boots, Ray and the evaluation slots
(they start concurrently: the server's address is known before it answers) -> run the ``evolve``
flow -> stop what was started. Ctrl-C or SIGTERM stops within seconds; every record already
written and the best config stay; the same command continues the search.
"""

from __future__ import annotations

import os
import sys

import click

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _option_decorators():
    """One click option per RunOptions field: name, type, default and help come from the field,
    aliases and flag style from its ``cli(...)`` metadata (evomerge.core.options)."""
    from typing import Literal, get_args, get_origin

    from evomerge.core.options import RunOptions, option_defaults

    defaults = option_defaults()
    for name, field in RunOptions.model_fields.items():
        meta = (field.json_schema_extra or {}).get("cli", {})
        spelled = meta.get("name") or f"--{name.replace('_', '-')}"
        aliases = meta.get("aliases", [])
        kind = field.annotation
        if get_origin(kind) not in (Literal, list):  # X | None -> X
            kind = next(a for a in (get_args(kind) or (kind,)) if a is not type(None))
        settings = {"default": defaults[name], "help": field.description, "show_default": defaults[name] is not None}
        decls = [spelled, *aliases, name]
        if kind is bool and meta.get("flag", "pair") == "pair":
            decls[0] = f"{spelled}/--no-{spelled[2:]}"
        elif kind is bool:
            settings["is_flag"] = True
        elif get_origin(kind) is Literal:
            settings["type"] = click.Choice(list(get_args(kind)))
        elif get_origin(kind) is list:
            settings.update(multiple=True, show_default=False)
            settings.pop("default")
        else:
            settings["type"] = kind
        yield click.option(*decls, **settings)


def _with_run_options(command):
    for decorator in reversed(list(_option_decorators())):
        command = decorator(command)
    return command


@click.command("evomerge", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--storage-path", required=True, help="Where records, checkpoints and the best config go (folder or s3://)."
)
@_with_run_options
def main(config: str, storage_path: str, **values) -> None:
    """Search the best merge of the models in CONFIG (a mergekit-evolve YAML file)."""
    from evomerge import stop_request
    from evomerge.backends.prepare import ConfigurationError, build_options, prepare_run, with_checked_tasks
    from evomerge.backends.run_lease import LeaseHeldError, RunLease
    from evomerge.backends.run_store import PREFLIGHT_RETRY_DELAYS, RunStore, StorageError
    from evomerge.core.checkpoint import CorruptStateError
    from evomerge.core.options import options_from_parameters
    from evomerge.run_manifest import StorageMismatchError, check_storage_path
    from evomerge.search_session import RunStoppedError

    _show_library_logs()
    try:
        options = build_options(**options_from_parameters(values))
        # Everything but the task names (lm-eval's import and task index): checked below, while
        # the Prefect server boots.
        spec = prepare_run(config, storage_path, options, check_task_names=False)
        store = RunStore(spec.storage_path, retry_delays=PREFLIGHT_RETRY_DELAYS)
        store.check_writable()
        check_storage_path(spec, store)
        RunLease(store).check_free()
    except (ConfigurationError, StorageMismatchError, LeaseHeldError, StorageError) as exc:
        _refuse(exc)

    _startup("options, config, models and storage path checked")
    stop_request.install()
    from evomerge.backends.ray_cluster import connect_ray, disconnect_ray
    from evomerge.backends.slot_pool import launch_early, slot_pool

    server, started_ray = None, False
    try:
        if not os.environ.get("PREFECT_API_URL"):
            from evomerge.backends.prefect_server import launch_prefect_server, wait_until_ready

            click.echo("evomerge: starting a private Prefect server on 127.0.0.1, Ray and the evaluation slots ...")
            server = launch_prefect_server()
            # Set before Prefect is first imported (it reads the URL then) and before Ray starts
            # (its workers get it): the address is known before the server answers.
            os.environ["PREFECT_API_URL"] = server.api_url
        else:
            click.echo(f"evomerge: using the Prefect server at {os.environ['PREFECT_API_URL']}")
        # The task names (lm-eval's import and task index) are checked while the server boots, and
        # before Ray starts, so that a misspelt task is refused at once.
        try:
            spec = with_checked_tasks(spec)
        except ConfigurationError as exc:
            _refuse(exc)  # the server is stopped below
        _startup("task names checked")
        started_ray = connect_ray(spec.options.ray_address)
        _startup("Ray started")
        launch_early(spec)  # the slot actors start while the server boots
        _startup("slots launched")
        # Imported only now: Prefect reads PREFECT_API_URL when it is first imported.
        from evomerge.flows.evolve import evolve

        _startup("flow imported")
        if server is not None:
            server = wait_until_ready(server)
            _startup("Prefect server ready")
            os.environ["PREFECT_API_URL"] = server.api_url
            click.echo(f"evomerge: Prefect UI at {server.ui_url} (open while the run lasts)")
        # The flow validates again, as a deployment run would; it runs in this directory, so
        # relative model paths resolve the same way.
        summary = evolve(config=os.path.abspath(config), storage_path=spec.storage_path, **spec.options.model_dump())
    except KeyboardInterrupt:
        _report_interrupted(spec.storage_path)
    except (
        RunStoppedError,
        StorageMismatchError,
        ConfigurationError,
        LeaseHeldError,
        StorageError,
        CorruptStateError,
    ) as exc:
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
        with slot_pool(spec):  # the early launch, if the flow never took it: stopped here
            pass
        disconnect_ray(started_ray)
        if server is not None:
            _flush_prefect_logs()
            server.stop()
    _print_summary(summary)


def _startup(phase: str) -> None:
    """A start-up milestone in the log (timestamped; benchmarks/orchestration_overhead.py reads them)."""
    import logging

    logging.getLogger("evomerge").info("start-up: %s", phase)


def _refuse(exc: Exception) -> None:
    """Bad input, found before any work: the message, and exit status 2."""
    click.echo(f"evomerge: error: {exc}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _show_library_logs() -> None:
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | evomerge - %(message)s", "%H:%M:%S")
    )
    logger = logging.getLogger("evomerge")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _flush_prefect_logs() -> None:
    """Send buffered run logs to the server before it stops (else they are lost, noisily)."""
    if "prefect" not in sys.modules:  # refused before any flow ran: nothing to send
        return
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
    click.echo(
        f"  evaluations spent : {summary['evaluations']} of {summary['max_fevals']}"
        f" ({summary['failed_evaluations']} failed)"
    )
    click.echo(f"  generations       : {summary['generations']}")
    if summary.get("items_scored") is not None:
        click.echo(
            f"  items scored      : {summary['items_scored']} of {summary['items_full']} "
            f"({summary['items_scored'] / summary['items_full']:.0%}; --racing stopped "
            f"{summary['stopped_early']} candidates early)"
        )
    best = summary.get("best_fitness")
    click.echo(f"  best fitness      : {best:.6f}" if best is not None else "  best fitness      : none")
    if summary.get("best_metrics"):
        for task, metrics in summary["best_metrics"].items():
            for metric, value in metrics.items():
                click.echo(f"    {task} {metric}: {value}")
    comparison = summary.get("comparison") or {}
    if comparison.get("gain_over_best_parent") is not None:
        click.echo(
            f"  over best parent  : {comparison['gain_over_best_parent']:+.6f} "
            f"({comparison['best_parent']}; on the search's tasks)"
        )
    closest = comparison.get("closest_baseline_held_out")
    if closest is not None:
        click.echo(f"  closest baseline  : {closest} (held out)")
    for label, d in (comparison.get("held_out_vs_baselines") or {}).items():
        click.echo(
            f"  held out vs {label}: {d['difference']:+.4f} +- {d['standard_error']:.4f} "
            f"({d['standard_errors']:.1f} SE)"
        )
    if best is not None:
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
