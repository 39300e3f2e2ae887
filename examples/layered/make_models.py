"""Build the layered example: two fine-tunes of the multiskill base whose skills live in
different layers and which, in the other layers, each forget the other's skill.

The multiskill example's two fine-tunes barely interfere: task arithmetic with weight 1.0 for
both, the same in every layer, keeps 1.43 of 1.50 and is as good as any per-layer recipe. Here
each fine-tune learned its skill in two decoder layers and was then trained on its own domain's
text in the other two, which made it forget the other skill there (a model adapted to a domain
keeps what it was told to keep and loses the rest):

* ``rev_expert``: the multiskill ``base`` with layers 0-1 fine-tuned on ``rev`` (the ``shift``
  prompts answered as the base answers them), then layers 2-3 trained on pseudo-text over
  another lexicon than the base's, its own ``rev`` answers kept by self-distillation;
* ``shift_expert``: the mirror image, ``shift`` learned in layers 2-3 and the domain text in
  layers 0-1.

One weight per model, the same in every layer, adds each skill together with the other model's
forgetting in the same layers, so no such setting keeps both skills; per layer group,
rev_expert's layers 0-1 and shift_expert's layers 2-3 do. Embeddings, ``lm_head`` and the norms
stay frozen (as in the multiskill example), so the task vectors lie in the attention and MLP
weights that the layer-group weights act on.

The base model, the tokenizer, the tasks and the train/validation/test split are the multiskill
example's (``examples/multiskill``); training sees only ``train`` strings.

Usage (from the repository root)::

    python examples/layered/make_models.py                 # -> examples/layered/models/
    python examples/layered/make_models.py --out /tmp/lay

Bit-identical across runs on the same machine and torch build (fixed seeds, one thread).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MULTISKILL = HERE.parent / "multiskill"
BASE_MODEL = MULTISKILL / "models" / "base"


def _load_multiskill():
    """Import the multiskill example's ``make_models.py`` (its training loop) by file path."""
    name = "_evomerge_multiskill_make_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MULTISKILL / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ms = _load_multiskill()
data = ms.data

# Where each expert learns its skill, and where it then trains on its own domain's text (and so
# forgets the other skill): decoder layer indices of the 4-layer base.
LAYOUT = {
    "rev": {"skill_layers": (0, 1), "domain_layers": (2, 3)},
    "shift": {"skill_layers": (2, 3), "domain_layers": (0, 1)},
}
SKILL_PHASE = {"lr": 3e-4, "schedule_steps": 300, "stop_at": 300, "warmup": 20}
DOMAIN_PHASE = {"lr": 1e-3, "schedule_steps": 200, "stop_at": 200, "warmup": 20}
DOMAIN_SEED_OFFSET = 7  # the domain text: pseudo-text over another lexicon than the base's
OWN = 0.7  # share of each phase's batches on what it teaches; the rest keeps behaviour
POOL = 4096  # prompts answered once by the model itself, for self-distillation
SEED = ms.SEED  # the multiskill base was built with it


def _layer_params(model, layers: tuple[int, ...]):
    """Attention and MLP weights of the given decoder layers (norms stay frozen)."""
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    return [p for n, p in model.named_parameters() if n.startswith(prefixes) and "norm" not in n]


def train_layered_expert(model, tokenizer, skill: str, *, seed: int, text_seed: int) -> tuple[float, float]:
    """Turn ``model`` (holding the base) into the ``skill`` expert in place: the skill in its
    skill layers, then its domain's text in its domain layers. Returns both final losses."""
    (other,) = [s for s in data.SKILLS if s != skill]
    layout = LAYOUT[skill]
    base_text = ms.PseudoText(text_seed)
    probe_batcher = ms.Batcher(tokenizer, base_text, seed=seed)
    # Phase 1: the skill; the other skill's prompts answered as the base answers them.
    kept_other = ms.answered_by(model, probe_batcher, other, POOL, f"keep-{seed}-{other}")
    batcher = ms.Batcher(tokenizer, base_text, seed=seed + 1, distill={other: kept_other})
    mix = {skill: OWN, f"distill:{other}": 1.0 - OWN}
    loss_skill = ms.train_only(model, _layer_params(model, layout["skill_layers"]), batcher, mix, SKILL_PHASE, seed)
    # Phase 2: the domain's text; the skill's own prompts answered as phase 1 answers them.
    kept_own = ms.answered_by(model, probe_batcher, skill, POOL, f"keep-{seed}-{skill}")
    domain = ms.PseudoText(text_seed + DOMAIN_SEED_OFFSET)
    batcher = ms.Batcher(tokenizer, domain, seed=seed + 2, distill={skill: kept_own})
    mix = {"text": OWN, f"distill:{skill}": 1.0 - OWN}
    params = _layer_params(model, layout["domain_layers"])
    loss_domain = ms.train_only(model, params, batcher, mix, DOMAIN_PHASE, seed + 1)
    return loss_skill, loss_domain


def build_example(out_dir: str | Path, *, seed: int = SEED) -> dict[str, Path]:
    """Build ``shift_expert`` and ``rev_expert`` under ``out_dir`` from the multiskill base;
    returns their folders (Hugging Face model folders with the base's tokenizer)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = {}
    with ms._deterministic_torch(seed):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(BASE_MODEL)
        probe = ms.Probe(ms.Batcher(tokenizer, ms.PseudoText(seed), seed=seed * 1000 + 1), seed)
        for i, skill in enumerate(data.SKILLS):
            t0 = time.perf_counter()
            model = LlamaForCausalLM.from_pretrained(BASE_MODEL, dtype=torch.float32)
            losses = train_layered_expert(model, tokenizer, skill, seed=seed * 1000 + 20 + 4 * i, text_seed=seed)
            name = f"{skill}_expert"
            ms._report(
                name,
                SKILL_PHASE["stop_at"] + DOMAIN_PHASE["stop_at"],
                losses[1],
                probe.exact_match(model),
                time.perf_counter() - t0,
            )
            paths[name] = out_dir / name
            ms._save(model, tokenizer, paths[name])
    print(f"built layered example (seed {seed}) in {time.perf_counter() - t_start:.1f}s -> {out_dir}", flush=True)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return ms.build_from_command_line(build_example, HERE / "models", __doc__, argv)


if __name__ == "__main__":
    main()
