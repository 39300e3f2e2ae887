"""One set of option names and defaults: RunOptions, the CLI and the evolve flow agree."""

import inspect

import pytest
from click.testing import CliRunner

from evomerge.backends.prepare import ConfigurationError, build_options
from evomerge.cli import main
from evomerge.core.options import RunOptions


def test_flow_parameters_match_run_options():
    from flows.evolve import evolve

    params = inspect.signature(evolve.fn).parameters
    flow_options = {k: p.default for k, p in params.items() if k not in ("config", "storage_path")}
    defaults = RunOptions().model_dump()
    assert set(flow_options) == set(defaults)
    for name, default in defaults.items():
        expected = None if name == "task_search_path" else default
        assert flow_options[name] == expected, name


def test_cli_options_match_run_options():
    cli_params = {p.name: p.default for p in main.params if p.name not in ("config", "storage_path")}
    defaults = RunOptions().model_dump()
    assert set(cli_params) == set(defaults)
    for name, default in defaults.items():
        if name == "task_search_path":
            continue  # a repeatable option: click's default is "none given"
        assert cli_params[name] == default, name


UPSTREAM_FLAGS = [
    "--max-fevals", "--vllm", "--no-vllm", "--strategy", "-s", "--in-memory", "--no-in-memory",
    "--storage-path", "--num-gpus", "--merge-cuda", "--no-merge-cuda", "--trust-remote-code",
    "--no-trust-remote-code", "--allow-crimes", "--no-allow-crimes", "--random-seed",
    "--batch-size", "--sigma0", "--wandb", "--no-wandb", "--wandb-project", "--wandb-entity",
    "--task-search-path", "--i-understand-the-depths-of-the-evils-i-am-unleashing",
    "--save-final-model", "--no-save-final-model", "--reshard", "--no-reshard", "--timeout",
    "--load-in-8bit", "--load-in-4bit", "--force-population-size",
]


def test_every_upstream_flag_is_accepted():
    declared = {opt for p in main.params for opt in (*p.opts, *p.secondary_opts)}
    assert [f for f in UPSTREAM_FLAGS if f not in declared] == []


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"strategy": "buffered", "in_memory": True}, "--in-memory merges inside the slot"),
        ({"vllm": True, "in_memory": True}, "--in-memory with --vllm"),
        ({"load_in_8bit": True}, "--load-in-8bit is not available yet"),
        ({"max_fevals": 0}, "max_fevals: must be at least 1"),
        ({"popsize": 1}, "popsize: must be at least 2"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "choose one"),
    ],
)
def test_unbuilt_or_bad_options_fail_clearly(values, fragment):
    with pytest.raises(ConfigurationError, match=fragment.replace("-", r"\-")):
        build_options(**values)


def test_cli_reports_bad_options_before_any_work(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("genome: {models: [/a, /b], merge_method: linear}\ntasks: [t]\n")
    result = CliRunner().invoke(main, [str(config), "--storage-path", str(tmp_path / "s"), "--load-in-4bit"])
    assert result.exit_code == 2
    assert "--load-in-4bit is not available yet" in result.output
    assert not (tmp_path / "s").exists()
