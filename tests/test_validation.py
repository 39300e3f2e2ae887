"""Bad input is refused before any work starts, with a message naming what and how to fix it."""

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import TASKS_DIR, write_config

from evomerge.cli import main


def run_cli(config, storage, *extra):
    return CliRunner().invoke(
        main, [str(config), "--storage-path", str(storage), "--task-search-path", str(TASKS_DIR), *extra]
    )


def assert_refused(result, *fragments, storage=None):
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    if storage is not None:
        assert not storage.exists(), "nothing may be written before validation passes"


def test_missing_model_folder(tmp_path, tiny_models):
    models = dict(tiny_models, rev_expert=tmp_path / "nope")
    config = write_config(tmp_path / "c.yml", models)
    assert_refused(
        run_cli(config, tmp_path / "s"), f"model '{tmp_path / 'nope'}' does not exist", storage=tmp_path / "s"
    )


def test_model_folder_without_config(tmp_path, tiny_models):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    config = write_config(tmp_path / "c.yml", dict(tiny_models, rev_expert=empty))
    assert_refused(run_cli(config, tmp_path / "s"), "has no config.json")


def test_a_model_path_that_is_a_file_says_so(tmp_path, tiny_models):
    config = write_config(tmp_path / "c.yml", dict(tiny_models, rev_expert=tiny_models["rev_expert"] / "config.json"))
    assert_refused(run_cli(config, tmp_path / "s"), "is a file, not a model folder", storage=tmp_path / "s")


@pytest.mark.parametrize("damage", ["truncated-weights", "garbage-header", "truncated-config", "no-weights"])
def test_damaged_model_files_are_refused_naming_the_file(tmp_path, tiny_models, damage):
    """A truncated download or a corrupt file is found from the safetensors headers and the
    config before any server starts (it used to fail every candidate after a minute)."""
    broken = tmp_path / "rev_expert"
    shutil.copytree(tiny_models["rev_expert"], broken)
    weights, config_file = broken / "model.safetensors", broken / "config.json"
    if damage == "truncated-weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) * 2 // 3])
        expected = (f"{weights} is damaged: tensor", "(truncated?)")
    elif damage == "garbage-header":
        data = weights.read_bytes()
        weights.write_bytes(data[:8] + b"\xff" * 16 + data[24:])
        expected = (f"{weights} is damaged: its header is not valid JSON",)
    elif damage == "truncated-config":
        config_file.write_text(config_file.read_text()[:30])
        expected = (f"{config_file} is damaged", "copy the model's config.json again")
    else:
        weights.unlink()
        expected = ("has no weights (no *.safetensors or *.bin file",)
    config = write_config(tmp_path / "c.yml", dict(tiny_models, rev_expert=broken))
    assert_refused(run_cli(config, tmp_path / "s"), *expected, storage=tmp_path / "s")


def test_a_tokenizer_source_that_is_no_model_folder_is_refused(tmp_path, tiny_models):
    for source, says in (
        (tmp_path / "nowhere", "(no such folder)"),
        (tiny_models["base"] / "config.json", "(it is a file)"),
    ):
        config = write_config(tmp_path / "c.yml", tiny_models, genome={"tokenizer_source": str(source)})
        assert_refused(run_cli(config, tmp_path / "s"), "genome.tokenizer_source", says, storage=tmp_path / "s")
    from evomerge.backends.prepare import build_options, prepare_run

    config = write_config(tmp_path / "c.yml", tiny_models, genome={"tokenizer_source": str(tiny_models["base"])})
    spec = prepare_run(str(config), str(tmp_path / "s"), build_options(), check_task_names=False)
    assert spec.config.genome.tokenizer_source == str(tiny_models["base"]), "a model folder is accepted"


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_models_of_different_architectures(tmp_path, tiny_models):
    other = _copy_with_config(tiny_models["rev_expert"], tmp_path / "m", architectures=["MistralForCausalLM"])
    config = write_config(tmp_path / "c.yml", dict(tiny_models, rev_expert=other))
    assert_refused(run_cli(config, tmp_path / "s"), "is a MistralForCausalLM but", "share one architecture")


def test_models_with_different_layer_counts(tmp_path, tiny_models):
    other = _copy_with_config(tiny_models["rev_expert"], tmp_path / "m", num_hidden_layers=7)
    config = write_config(tmp_path / "c.yml", dict(tiny_models, rev_expert=other))
    assert_refused(run_cli(config, tmp_path / "s"), "has 7 layers but", "same number of layers")


def test_granularity_that_does_not_divide_layers(tmp_path, tiny_models):
    config = write_config(tmp_path / "c.yml", tiny_models, genome={"layer_granularity": 3})
    assert_refused(
        run_cli(config, tmp_path / "s"), "layer_granularity 3 does not divide", "use 0 (one group) or one of"
    )


def test_unknown_task_names_the_search_paths(tmp_path, tiny_models):
    config = write_config(tmp_path / "c.yml", tiny_models, tasks=[{"name": "tiny_revv"}])
    result = run_cli(config, tmp_path / "s")
    assert_refused(result, "cannot find task 'tiny_revv'", "did you mean tiny_rev", str(TASKS_DIR), "built-in tasks")


def test_unknown_method_and_missing_base(tmp_path, tiny_models):
    config = write_config(tmp_path / "c.yml", tiny_models, genome={"merge_method": "magic"})
    assert_refused(run_cli(config, tmp_path / "s"), "genome.merge_method: unknown merge method 'magic'")
    config = write_config(tmp_path / "d.yml", tiny_models, genome={"merge_method": "ties", "base_model": None})
    assert_refused(run_cli(config, tmp_path / "s"), "needs genome.base_model")


def test_no_tasks_and_bad_yaml(tmp_path, tiny_models):
    config = write_config(tmp_path / "c.yml", tiny_models, tasks=[])
    assert_refused(run_cli(config, tmp_path / "s"), "add at least one lm-eval task")
    bad = tmp_path / "bad.yml"
    bad.write_text("genome: [unclosed\n")
    assert_refused(run_cli(bad, tmp_path / "s"), "is not valid YAML")


def test_benchmark_task_needs_upstreams_flag(tmp_path, tiny_models):
    config = write_config(tmp_path / "c.yml", tiny_models, tasks=[{"name": "gsm8k"}])
    assert_refused(run_cli(config, tmp_path / "s"), "is a public benchmark", "--i-understand-the-depths")


def test_unknown_held_out_task_is_refused_before_any_work(tmp_path, tiny_models):
    config = write_config(tmp_path / "c.yml", tiny_models, held_out_tasks=[{"name": "tiny_rev_test"}])
    storage = tmp_path / "s"
    assert_refused(
        run_cli(config, storage), "cannot find task 'tiny_rev_test'", "did you mean tiny_rev", storage=storage
    )


def test_a_ray_address_where_nothing_listens_is_refused_before_any_work(tmp_path, tiny_models):
    from evomerge.backends.prefect_server import free_port

    config = write_config(tmp_path / "c.yml", tiny_models)
    storage = tmp_path / "s"
    address = f"127.0.0.1:{free_port()}"
    assert_refused(
        run_cli(config, storage, "--ray-address", address),
        f"--ray-address {address}: nothing answers",
        "ray start --head",
        storage=storage,
    )


def test_a_storage_path_that_is_a_file_or_cannot_be_written_is_refused_before_any_work(tmp_path, tiny_models):
    config = write_config(tmp_path / "c.yml", tiny_models)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert_refused(run_cli(config, a_file), f"--storage-path {a_file} is a file; give a folder")
    # A parent nobody may write in, root included (sysfs): refused, not found after servers started.
    assert_refused(
        run_cli(config, "/sys/evomerge-run"), "--storage-path /sys/evomerge-run cannot be written", "choose a folder"
    )


def test_s3_without_credentials_or_without_an_answer_is_one_message_before_any_work(tmp_path, tiny_models):
    import s3fs

    from evomerge.backends.prefect_server import free_port

    s3fs.S3FileSystem.clear_instance_cache()
    config = write_config(tmp_path / "c.yml", tiny_models)
    no_credentials = {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "PREFECT_API_URL": None,
    }
    args = [str(config), "--storage-path", "s3://evomerge-test/run", "--task-search-path", str(TASKS_DIR)]
    result = CliRunner().invoke(main, args, env=no_credentials)
    assert result.exit_code == 2 and "no credentials for the object store" in result.output, result.output
    assert "Set AWS credentials" in result.output and "Traceback" not in result.output
    nothing_listens = dict(no_credentials, AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps the first client, credentials and all
    result = CliRunner().invoke(main, args, env=nothing_listens)
    assert result.exit_code == 2, result.output
    assert "could not write s3://evomerge-test/run/.evomerge-write-probe" in result.output, result.output
    assert "once the storage is reachable" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--sigma0", "inf", "sigma0: must be a positive, finite step size"),
        ("--sigma0", "nan", "sigma0: must be a positive, finite step size"),
        ("--sigma0", "0", "sigma0: must be a positive, finite step size"),
        ("--seed", "-1", "seed: Input should be greater than or equal to 0"),
        ("--seed", str(2**32), "seed: Input should be less than 4294967296"),
    ],
)
def test_a_bad_option_value_is_refused_naming_the_option(tmp_path, tiny_models, option, value, says):
    config = write_config(tmp_path / "c.yml", tiny_models)
    assert_refused(run_cli(config, tmp_path / "s", option, value), says, storage=tmp_path / "s")


def test_bad_config_values_and_hostile_yaml_are_refused_cheaply(tmp_path, tiny_models):
    storage = tmp_path / "s"
    config = write_config(tmp_path / "c.yml", tiny_models, num_fewshot=-3)
    assert_refused(run_cli(config, storage), "num_fewshot: must be 0 or a positive number", storage=storage)
    one = tmp_path / "one.yml"
    one.write_text(f"genome:\n  models: [{tiny_models['rev_expert']}]\n  merge_method: linear\ntasks: [tiny_rev]\n")
    assert_refused(run_cli(one, storage), "would merge one model", "List at least two models", storage=storage)
    # A "billion laughs" under genome.models: refused at the first alias, in a short message.
    bomb = tmp_path / "bomb.yml"
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb.write_text("\n".join(levels) + "\ngenome:\n  models: *a8\n  merge_method: linear\ntasks: [t]\n")
    result = run_cli(bomb, storage)
    assert_refused(result, "YAML aliases (*name) are not allowed", storage=storage)
    assert len(result.output) < 2000
    latin1 = tmp_path / "latin1.yml"
    latin1.write_bytes(config.read_text().replace("num_fewshot: -3", "# caf\xe9").encode("latin-1"))
    assert_refused(run_cli(latin1, storage), f"{latin1} is not UTF-8 text", storage=storage)


def test_a_long_invalid_value_is_never_echoed_whole(tmp_path, tiny_models):
    long_list = [f"/no/such/model-{i:05d}" for i in range(20000)]
    config = write_config(tmp_path / "c.yml", tiny_models, genome={"models": long_list, "merge_method": "nuslerp"})
    result = run_cli(config, tmp_path / "s")
    assert result.exit_code == 2 and len(result.output) < 3000, len(result.output)


def test_a_metric_the_tasks_yaml_never_produces_is_refused_before_any_work(tmp_path, tiny_models):
    """tiny_rev's YAML lists acc only (was found at the first evaluation, after the servers and
    slots had started; a task whose YAML lists no metrics still is: tests/test_search_session.py)."""
    config = write_config(tmp_path / "c.yml", tiny_models, tasks=[{"name": "tiny_rev", "metric": "f1,none"}])
    assert_refused(
        run_cli(config, tmp_path / "s"),
        "task 'tiny_rev' does not produce metric 'f1,none'; it produces acc,none",
        "Set 'metric:' of the task",
        storage=tmp_path / "s",
    )


def test_racing_a_task_that_cannot_be_raced_is_refused_before_any_work(tmp_path, tiny_models):
    """--racing scores tasks in stages: a group of tasks, or a metric whose YAML aggregates it
    otherwise than as a mean over items, is refused naming the task (the CLI, then the check
    itself for the group)."""
    from evomerge.backends.prepare import ConfigurationError, check_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml_text = (TASKS_DIR / "tiny_rev.yaml").read_text().replace("task: tiny_rev", "task: tiny_rev_median")
    (tasks / "tiny_rev_median.yaml").write_text(yaml_text.replace("aggregation: mean", "aggregation: median"))
    (tasks / "both.yaml").write_text("group: both_skills\ntask: [tiny_rev, tiny_shift]\n")
    config = write_config(tmp_path / "c.yml", tiny_models, tasks=[{"name": "tiny_rev_median"}])
    result = run_cli(config, tmp_path / "s", "--task-search-path", str(tasks), "--racing")
    assert_refused(
        result, "--racing needs metrics that are means over items", "'tiny_rev_median'", storage=tmp_path / "s"
    )
    assert run_cli(config, tmp_path / "s", "--task-search-path", str(tasks), "--max-items", "100").exit_code == 2
    with pytest.raises(ConfigurationError, match="'both_skills' is a group or tag"):
        check_tasks(["both_skills"], [str(TASKS_DIR), str(tasks)], [("both_skills", "acc,none")], raced=["both_skills"])
    check_tasks(["tiny_rev"], [str(TASKS_DIR)], [("tiny_rev", "acc,none")], raced=["tiny_rev"])  # a mean: raced
