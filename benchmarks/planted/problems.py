"""Planted-optimum problems for lm-eval: merges of broken copies of one model, where a known
recipe gives the model back and scores exactly 1.0.

Construction (all on the CPU in seconds, deterministic):

- ``original``: a random tiny Llama (hidden 32, 4 or 8 layers, bfloat16 weights, a character
  tokenizer). Its weights are drawn wide (std 0.3) so that the decoder layers, not the residual
  path alone, decide the next character.
- Sources: copies of ``original`` in which some layer groups are replaced by the layers of
  another random model (each source its own); every group is intact in at least one source.
- Task ``planted_<layers>``: 4-way multiple choice over the next character after a random
  8-character context; the gold choice is ``original``'s most likely one, and only items where
  it wins by a log-likelihood margin of at least ``MARGIN`` are kept, so that bfloat16 rounding
  in a merge never flips them. ``original`` and every merge that reproduces it score 1.0;
  breaking layers flips a share of the items.

Each problem is a ``mergekit-evolve`` config (genome + the task) that upstream and evomerge both
read unchanged, plus the recipe that restores ``original`` (``optimum``). The uniform merge's
score and the optimum's are measured, not assumed (``search_quality.py`` prints them).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

HIDDEN = 32
CONTEXT = 8
CHOICES = 4
ITEMS = 100
MARGIN = 0.15  # log-likelihood gap between the gold choice and the next one
INIT_STD = 0.3
ALPHABET = string.ascii_lowercase + string.digits
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class Source:
    name: str
    broken_layers: tuple[int, ...]


@dataclass(frozen=True)
class Problem:
    """One planted problem: ``genome`` is the mergekit-evolve genome section (model names
    relative to the models folder), ``intact`` which source restores each layer group."""

    name: str
    merge_method: str
    num_layers: int
    layer_granularity: int
    sources: tuple[Source, ...]
    base: str | None = None
    normalize: bool | None = None
    high_dimensional: bool = False

    @property
    def task(self) -> str:
        return f"planted_{self.num_layers}"

    @property
    def groups(self) -> int:
        return self.num_layers // self.layer_granularity

    def intact_source(self, group: int) -> str:
        """The source that gives ``original`` back in ``group`` (the base when it does)."""
        layers = set(range(group * self.layer_granularity, (group + 1) * self.layer_granularity))
        ordered = sorted(self.sources, key=lambda s: s.name != self.base)  # base first
        for source in ordered:
            if not layers & set(source.broken_layers):
                return source.name
        raise ValueError(f"{self.name}: group {group} is broken in every source")


def _halves(num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    half = num_layers // 2
    return tuple(range(half)), tuple(range(half, num_layers))


LOW, HIGH = _halves(4)
TWO = (Source("a", LOW), Source("b", HIGH))
THREE = (Source("a", LOW), Source("b", HIGH), Source("z", LOW + HIGH))
# 8 layers: three sources, each intact in every third layer.
EVERY_THIRD = tuple(Source(name, tuple(layer for layer in range(8) if layer % 3 != i)) for i, name in enumerate("pqr"))
PROBLEMS: tuple[Problem, ...] = (
    Problem("linear-2", "linear", 4, 2, TWO),
    Problem("linear-3", "linear", 4, 2, (Source("a", LOW), Source("b", HIGH), Source("c", LOW + HIGH))),
    Problem("task_arithmetic-2", "task_arithmetic", 4, 2, TWO, base="a"),
    Problem("task_arithmetic-3", "task_arithmetic", 4, 2, THREE, base="z"),
    Problem("ties-2", "ties", 4, 2, TWO, base="a", normalize=False),
    Problem("ties-3", "ties", 4, 2, THREE, base="z", normalize=False),
    Problem("dare_ties-2", "dare_ties", 4, 2, TWO, base="a", normalize=False),
    Problem("slerp-2", "slerp", 4, 2, TWO),
    # 8 layers, one group per layer, three sources each intact in every third layer: 24 weights.
    Problem(
        "linear-3-layers",
        "linear",
        8,
        1,
        EVERY_THIRD,
        high_dimensional=True,
    ),
    # The same three sources merged by task arithmetic over a base broken in every layer: 24
    # weights, not normalized, each layer's optimum one weight 1 and two 0.
    Problem(
        "task_arithmetic-3-layers",
        "task_arithmetic",
        8,
        1,
        (*EVERY_THIRD, Source("z", tuple(range(8)))),
        base="z",
        high_dimensional=True,
    ),
)
BY_NAME = {p.name: p for p in PROBLEMS}


# --- models ------------------------------------------------------------------------------------
def _write_tokenizer(path: Path) -> None:
    """A character-level tokenizer that transformers 4.57 and 5.x both load."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*SPECIALS, *ALPHABET])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 64,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )


def _config(num_layers: int) -> dict:
    """A config.json both transformers 4.57 and 5.x read (the 4.x keys)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": HIDDEN // 2,
        "num_hidden_layers": num_layers,
        "vocab_size": len(SPECIALS) + len(ALPHABET),
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "use_cache": True,
    }


def _random_model(num_layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in _config(num_layers).items() if k not in ("architectures", "torch_dtype")})
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.dim() == 2:
                tensor.normal_(0.0, INIT_STD)
    return model.to(torch.bfloat16).eval()


def _save(model, path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (path / "config.json").write_text(json.dumps(_config(model.config.num_hidden_layers), indent=1))
    _write_tokenizer(path)


def _broken_copy(original, source: Source, seed: int):
    import copy

    donor = _random_model(original.config.num_hidden_layers, seed)
    model = copy.deepcopy(original)
    with torch.no_grad():
        for layer in source.broken_layers:
            model.model.layers[layer].load_state_dict(donor.model.layers[layer].state_dict())
    return model


# --- the task ----------------------------------------------------------------------------------
def _choice_logprobs(model, contexts: list[str], choices: list[list[str]]) -> torch.Tensor:
    """log p(choice | context) for each item's choices, as lm-eval's HF model computes it
    (context tokens, no BOS, one continuation token), in float32."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *ALPHABET])}
    ids = torch.tensor([[vocab[c] for c in context] for context in contexts])
    with torch.no_grad():
        logits = model.float()(ids).logits[:, -1, :]
    logprobs = torch.log_softmax(logits, dim=-1)
    model.to(torch.bfloat16)
    index = torch.tensor([[vocab[c] for c in row] for row in choices])
    return logprobs.gather(1, index)


def _make_items(original, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items: list[dict] = []
    while len(items) < ITEMS:
        contexts = ["".join(rng.choice(ALPHABET) for _ in range(CONTEXT)) for _ in range(256)]
        choices = [rng.sample(ALPHABET, CHOICES) for _ in contexts]
        scores = _choice_logprobs(original, contexts, choices)
        top2 = scores.topk(2, dim=1)
        for context, row, values, indices in zip(contexts, choices, top2.values, top2.indices, strict=True):
            if float(values[0] - values[1]) >= MARGIN and len(items) < ITEMS:
                items.append({"context": context, "choices": row, "label": int(indices[0])})
    return items


def _task_yaml(task: str, data_file: Path) -> dict:
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data_file)}},
        "validation_split": "validation",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def agreement(model, items: list[dict]) -> float:
    """Share of items where ``model`` picks the gold choice (a quick check, not the score)."""
    scores = _choice_logprobs(model, [i["context"] for i in items], [i["choices"] for i in items])
    return float((scores.argmax(1) == torch.tensor([i["label"] for i in items])).float().mean())


# --- building ----------------------------------------------------------------------------------
def build(root: Path) -> dict[str, Path]:
    """Models, tasks and one config per problem under ``root``; returns problem -> config path.
    Skips what exists (delete ``root`` to rebuild)."""
    root = root.resolve()
    models, tasks, configs = root / "models", root / "tasks", root / "configs"
    for folder in (models, tasks, configs):
        folder.mkdir(parents=True, exist_ok=True)
    originals = {}
    for layers in sorted({p.num_layers for p in PROBLEMS}):
        original = _random_model(layers, seed=1000 + layers)
        originals[layers] = original
        data_file = tasks / f"planted_{layers}.jsonl"
        if not data_file.exists():
            items = _make_items(original, seed=layers)
            data_file.write_text("".join(json.dumps(i) + "\n" for i in items))
            (tasks / f"planted_{layers}.yaml").write_text(yaml.safe_dump(_task_yaml(f"planted_{layers}", data_file)))
        if not (models / f"original_{layers}").exists():
            _save(original, models / f"original_{layers}")
    for problem in PROBLEMS:
        for source in problem.sources:
            path = models / _model_name(problem, source)
            if not path.exists():
                seed = 2000 + 100 * problem.num_layers + (ord(source.name) - ord("a"))
                _save(_broken_copy(originals[problem.num_layers], source, seed), path)
        genome: dict = {
            "models": [str(models / _model_name(problem, s)) for s in problem.sources if s.name != problem.base],
            "merge_method": problem.merge_method,
            "layer_granularity": problem.layer_granularity,
        }
        if problem.base is not None:
            base = next(s for s in problem.sources if s.name == problem.base)
            genome["base_model"] = str(models / _model_name(problem, base))
        if problem.normalize is not None:
            genome["normalize"] = problem.normalize
        # Upstream's default applies a chat template, which a tiny model has not got (evomerge's
        # default does not): said explicitly, both read the config alike.
        config = {"genome": genome, "tasks": [{"name": problem.task}], "apply_chat_template": False}
        (configs / f"{problem.name}.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return {p.name: configs / f"{p.name}.yml" for p in PROBLEMS}


def _model_name(problem: Problem, source: Source) -> str:
    return f"l{problem.num_layers}_{source.name}_broken_" + "".join(str(layer) for layer in source.broken_layers)


def optimum_vector(problem: Problem, space) -> list[float]:
    """The restoring recipe as a vector of evomerge's ``SearchSpace`` for this problem's config
    (a source's model folder is named ``l<layers>_<source>_broken_...``)."""
    values = optimum_values(problem)
    source = {m: Path(m).name.split("_")[1] for m in space.weighted_models}
    return [values[(c.group, source.get(c.model) if c.model else None, c.parameter)] for c in space.coordinates]


def optimum_values(problem: Problem) -> dict[tuple[int, str | None, str], float]:
    """The restoring recipe as ``(group, source model name or None, parameter) -> value``."""
    values: dict[tuple[int, str | None, str], float] = {}
    weighted = [s.name for s in problem.sources if s.name != problem.base]
    for group in range(problem.groups):
        intact = problem.intact_source(group)
        if problem.merge_method == "slerp":
            values[(group, None, "t")] = 0.0 if intact == problem.sources[0].name else 1.0
            continue
        for name in weighted:
            values[(group, name, "weight")] = 1.0 if name == intact else 0.0
            if problem.merge_method in ("ties", "dare_ties"):
                values[(group, name, "density")] = 1.0
    return values


if __name__ == "__main__":
    import sys

    for name, path in build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/planted")).items():
        print(name, path)
