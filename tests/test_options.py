"""Options are declared once (RunOptions); the CLI and the evolve flow's parameters are generated
from it and must agree with it."""

import inspect

import pytest
from click.testing import CliRunner

from evomerge.backends.prepare import ConfigurationError, build_options
from evomerge.cli import main
from evomerge.core.options import RunOptions


def test_flow_parameters_match_run_options():
    from prefect.utilities.callables import parameter_schema

    from evomerge.flows.evolve import evolve

    params = inspect.signature(evolve).parameters
    flow_options = {k: p.default for k, p in params.items() if k not in ("config", "storage_path")}
    defaults = RunOptions().model_dump()
    assert set(flow_options) == set(defaults)
    for name, default in defaults.items():
        # unset: a list option, and sigma0 (which the searcher's default fills in)
        expected = None if name in ("task_search_path", "sigma0") else default
        assert flow_options[name] == expected, name
    # what `prefect deploy` publishes as the deployment's parameters
    schema = parameter_schema(evolve)
    assert set(schema.properties) == {"config", "storage_path", *defaults}
    assert set(schema.required) == {"config", "storage_path"}
    assert schema.properties["strategy"]["enum"] == ["pool", "buffered", "serial"]


def test_cli_options_match_run_options():
    cli_params = {p.name: p.default for p in main.params if p.name not in ("config", "storage_path")}
    defaults = RunOptions().model_dump()
    assert set(cli_params) == set(defaults)
    for name, default in defaults.items():
        if name == "task_search_path":
            continue  # a repeatable option: click's default is "none given"
        if name == "sigma0":
            assert cli_params[name] is None  # unset: the searcher's default fills it in
            continue
        assert cli_params[name] == default, name


def test_a_cli_command_line_becomes_the_same_run_options_as_the_flow_parameters(tmp_path, monkeypatch):
    """The values the CLI collects and the ones a deployment run passes build equal RunOptions."""
    from evomerge.core.options import options_from_parameters

    seen = {}
    monkeypatch.setattr(
        "evomerge.backends.prepare.prepare_run",
        lambda config, storage, options, **kw: (_ for _ in ()).throw(ConfigurationError(repr(options))),
    )
    args = [
        "--random-seed",
        "7",
        "--force-population-size",
        "6",
        "--no-baselines",
        "-s",
        "serial",
        "--task-search-path",
        "a",
        "--task-search-path",
        "b",
        "--searcher",
        "random",
        "--timeout",
        "60",
    ]
    result = CliRunner().invoke(main, [str(tmp_path / "c.yml"), "--storage-path", str(tmp_path / "s"), *args])
    seen["cli"] = result.output
    flow_values = {
        "seed": 7,
        "popsize": 6,
        "baselines": False,
        "strategy": "serial",
        "task_search_path": ["a", "b"],
        "searcher": "random",
        "timeout": 60.0,
    }
    expected = build_options(**options_from_parameters(flow_values))
    assert repr(expected) in seen["cli"]


UPSTREAM_FLAGS = [
    "--max-fevals",
    "--vllm",
    "--no-vllm",
    "--strategy",
    "-s",
    "--in-memory",
    "--no-in-memory",
    "--storage-path",
    "--num-gpus",
    "--merge-cuda",
    "--no-merge-cuda",
    "--trust-remote-code",
    "--no-trust-remote-code",
    "--allow-crimes",
    "--no-allow-crimes",
    "--random-seed",
    "--batch-size",
    "--sigma0",
    "--wandb",
    "--no-wandb",
    "--wandb-project",
    "--wandb-entity",
    "--task-search-path",
    "--i-understand-the-depths-of-the-evils-i-am-unleashing",
    "--save-final-model",
    "--no-save-final-model",
    "--reshard",
    "--no-reshard",
    "--timeout",
    "--load-in-8bit",
    "--load-in-4bit",
    "--force-population-size",
]


def test_every_upstream_flag_is_accepted():
    declared = {opt for p in main.params for opt in (*p.opts, *p.secondary_opts)}
    assert [f for f in UPSTREAM_FLAGS if f not in declared] == []


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"strategy": "buffered", "in_memory": True}, "--in-memory merges inside the slot"),
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


def test_sigma0_defaults_to_the_searchers_own_and_an_explicit_one_is_kept():
    assert RunOptions().searcher == "cma-es-box"
    assert RunOptions().sigma0 == 0.5
    assert RunOptions(searcher="cma-es-box-mirrored-elitist").sigma0 == 0.5
    assert RunOptions(searcher="cma-es").sigma0 == 1 / 6  # upstream's, and 0.2's default
    assert RunOptions(sigma0=0.05).sigma0 == 0.05
    assert RunOptions(searcher="cma-es", sigma0=0.25).sigma0 == 0.25
    with pytest.raises(ValueError, match="positive, finite step size"):
        RunOptions(sigma0=0.0)


def _numeric_options() -> list[str]:
    return [
        name
        for name, field in RunOptions.model_fields.items()
        if any(t in str(field.annotation) for t in ("int", "float")) and field.annotation is not bool
    ]


@pytest.mark.parametrize("value", [-1, float("nan")], ids=["negative", "nan"])
@pytest.mark.parametrize("name", _numeric_options())
def test_every_numeric_option_refuses_negative_and_nan_values_naming_itself(name, value):
    """Applied to every option RunOptions declares: a new numeric option is covered by this table."""
    from evomerge.backends.prepare import ConfigurationError, build_options

    with pytest.raises(ConfigurationError, match=rf"options: {name}: "):
        build_options(**{name: value})
