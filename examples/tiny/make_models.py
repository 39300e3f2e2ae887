"""Build the tiny offline example: a tokenizer, a base model and two "fine-tunes".

Everything is synthetic and made on the CPU in well under a minute, so that the whole
evomerge pipeline (mergekit -> lm-eval -> CMA-ES) can run without the Hugging Face Hub
or a GPU.

* a byte-level BPE tokenizer (one token per digit) trained on the skill strings;
* ``base``: a 4-layer ``LlamaForCausalLM`` (hidden 64) trained briefly on a mix of the
  two skills of ``tasks/make_data.py`` (``shift 4829=5930`` and ``rev 4829=9284``),
  so that both are only emerging;
* ``shift_expert`` / ``rev_expert``: ``base`` trained a little more on one skill, with
  the embeddings, ``lm_head`` and norms frozen so that the task vectors live in the
  attention and MLP weights of the decoder layers.

Usage (from the repository root)::

    python examples/tiny/make_models.py                 # -> examples/tiny/models/{base,...}
    python examples/tiny/make_models.py --quick --out /tmp/tiny

or from Python::

    from make_models import build_example   # with examples/tiny on sys.path
    paths = build_example("/tmp/tiny", quick=True)

The result is bit-identical across runs on the same machine and torch build (fixed
seeds, one intra-op thread while training).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL_NAMES = ("base", "shift_expert", "rev_expert")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def _load_data_module():
    """Import ``tasks/make_data.py`` (skills and the held-out split) by file path."""
    name = "_evomerge_tiny_make_data"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "tasks" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


data = _load_data_module()

# Full and quick training schedules.  Steps are optimizer steps of `batch` sequences.
# The base trains on `base_mix` (skill probabilities, rebalanced toward the weaker skill
# at each probe) until its mean probe accuracy reaches `base_target` (at most
# `base_max_steps` steps); each expert then trains `expert_steps` steps on its own
# skill, with a `replay` share of the other skill (less forgetting, better merges).
FULL = dict(
    base_max_steps=300,
    base_target=0.67,
    expert_steps=80,
    batch=64,
    base_lr=3e-3,
    expert_lr=2e-3,
    base_mix={"shift": 0.3, "rev": 0.7},
    replay=0.05,
)
QUICK = dict(
    base_max_steps=200,
    base_target=0.55,
    expert_steps=60,
    batch=48,
    base_lr=3e-3,
    expert_lr=3e-3,
    base_mix={"shift": 0.3, "rev": 0.7},
    replay=0.05,
)
MODEL_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)


@contextmanager
def _deterministic_torch(seed: int):
    """One intra-op thread and fixed seeds; restores the thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(seed: int = 0):
    """Byte-level BPE with digits pre-tokenized one by one, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(f"tokenizer-{seed}")
    corpus = []
    for _ in range(2000):
        skill = rng.choice(data.SKILLS)
        x = data.random_digits(rng)
        corpus.append(data.prompt(skill, x) + data.APPLY[skill](x))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- data
class Batcher:
    """Random training sequences ``<prompt><answer></s>`` with loss on answer + eos only.

    No BOS is prepended: the tokenizer has no post-processor, so ``encode`` (and hence
    lm-eval's HF backend, with its default ``add_bos_token``) adds no special tokens,
    and training and scoring see the same token sequences.
    """

    def __init__(self, tokenizer, seed: int):
        self.rng = random.Random(seed)
        vocab = tokenizer.get_vocab()
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        # Digits are single tokens, so ids are assembled directly (much faster than
        # calling the tokenizer per sample); checked against the tokenizer once here.
        self.digit = {c: vocab[c] for c in "0123456789"}
        self.equals = vocab["="]
        self.head = {s: tokenizer.encode(f"{s} ", add_special_tokens=False) for s in data.SKILLS}
        for s in data.SKILLS:
            x = "40719"
            assert self._prompt_ids(s, x) == tokenizer.encode(data.prompt(s, x), add_special_tokens=False), (
                "tokenizer does not split prompts as expected"
            )

    def _prompt_ids(self, skill: str, x: str) -> list[int]:
        return self.head[skill] + [self.digit[c] for c in x] + [self.equals]

    def _digits(self, rng: random.Random | None = None) -> str:
        while True:
            x = data.random_digits(rng or self.rng)
            if not data.is_heldout(x):
                return x

    def batch(self, mix: dict[str, float], size: int):
        """``size`` sequences, skills drawn with probabilities ``mix``."""
        skills, weights = list(mix), list(mix.values())
        seqs, labels = [], []
        for _ in range(size):
            skill = self.rng.choices(skills, weights)[0]
            x = self._digits()
            p = self._prompt_ids(skill, x)
            a = [self.digit[c] for c in data.APPLY[skill](x)] + [self.eos]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in seqs])
        lab = torch.tensor([ls + [-100] * (width - len(ls)) for ls in labels])
        return ids, lab


class Probe:
    """Multiple-choice accuracy, scored like lm-eval's ``acc``, on TRAINING-split items.

    Used to stop the base model's training once both skills are emerging, which makes
    the recipe robust to the seed (the skills appear after a sharp, seed-dependent
    number of steps).  The items are built like the validation items, but from digit
    strings outside the held-out split.
    """

    def __init__(self, batcher: Batcher, seed: int, n: int = 48):
        rng = random.Random(f"probe-{seed}")
        self.batches = {}
        for skill in data.SKILLS:
            seqs, spans, labels = [], [], []
            while len(labels) < n:
                item = data.make_item(skill, batcher._digits(rng), rng)
                if item is None:
                    continue
                p = batcher._prompt_ids(skill, item["input"])
                for choice in item["choices"]:
                    seqs.append(p + [batcher.digit[c] for c in choice])
                    spans.append((len(p), len(choice)))
                labels.append(item["label"])
            width = max(map(len, seqs))
            ids = torch.tensor([q + [batcher.pad] * (width - len(q)) for q in seqs])
            # mask[i, t] is 1 where position t predicts a choice token of sequence i
            mask = torch.zeros(len(seqs), width - 1)
            for i, (start, length) in enumerate(spans):
                mask[i, start - 1 : start - 1 + length] = 1.0
            self.batches[skill] = (ids, mask, torch.tensor(labels))

    @torch.no_grad()
    def accuracy(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        out = {}
        for skill, (ids, mask, labels) in self.batches.items():
            logp = model(input_ids=ids).logits[:, :-1].log_softmax(-1)
            tok = logp.gather(-1, ids[:, 1:, None])[..., 0]
            scores = (tok * mask).sum(-1).view(-1, 4)
            out[skill] = float((scores.argmax(-1) == labels).float().mean())
        model.train(was_training)
        return out


def _train(
    model,
    batcher: Batcher,
    mix: dict[str, float],
    *,
    steps: int,
    batch: int,
    lr: float,
    params,
    until=None,
    check_every: int = 10,
    check_from: int = 50,
) -> tuple[int, float]:
    """AdamW with linear warmup.  Without ``until``: linear decay over ``steps``.

    With ``until`` (a predicate on the model): constant rate after warmup, checked every
    ``check_every`` steps from step ``check_from`` on; training stops as soon as it
    holds, or after ``steps``.
    Returns (steps taken, last batch loss).
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = 10 if until is not None else max(1, steps // 10)

    def factor(s: int) -> float:
        ramp = min(1.0, (s + 1) / warmup)
        return ramp if until is not None else ramp * max(0.05, 1 - s / steps)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    loss = torch.tensor(float("nan"))
    step = 0
    while step < steps:
        ids, lab = batcher.batch(mix, batch)
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if until is not None and step >= check_from and step % check_every == 0 and until(model):
            break
    model.eval()
    return step, float(loss.detach())


def _layer_params(model):
    """Trainable in the fine-tunes: attention and MLP weights of the decoder layers."""
    return [p for n, p in model.named_parameters() if ".layers." in n and "norm" not in n]


# --------------------------------------------------------------------------- build
def build_example(out_dir: str | Path, *, seed: int = 0, quick: bool = False) -> dict[str, Path]:
    """Build tokenizer, ``base``, ``shift_expert`` and ``rev_expert`` under ``out_dir``.

    Returns ``{"base": path, "shift_expert": path, "rev_expert": path}``; each path is a
    Hugging Face model folder (config.json, model.safetensors, tokenizer files).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    cfg = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in MODEL_NAMES}

    with _deterministic_torch(seed):
        tokenizer = train_tokenizer(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            **MODEL_SHAPE,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        batcher = Batcher(tokenizer, seed=seed * 1000 + 1)
        probe = Probe(batcher, seed)
        report = {}

        mix = dict(cfg["base_mix"])

        def emerging(m) -> bool:
            """Stop once both skills are emerging; else rebalance toward the laggard."""
            acc = probe.accuracy(m)
            if sum(acc.values()) / len(acc) >= cfg["base_target"]:
                return True
            mix.update({k: 0.1 + (1.0 - v) for k, v in acc.items()})
            return False

        steps, loss = _train(
            model,
            batcher,
            mix,
            steps=cfg["base_max_steps"],
            batch=cfg["batch"],
            lr=cfg["base_lr"],
            params=list(model.parameters()),
            until=emerging,
            check_every=5,
        )
        report["base"] = (steps, loss, probe.accuracy(model))
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save(model, tokenizer, paths["base"])

        for i, skill in enumerate(data.SKILLS):
            model.load_state_dict(base_state)
            torch.manual_seed(seed * 1000 + 10 + i)
            for p in model.parameters():
                p.requires_grad_(False)
            params = _layer_params(model)
            for p in params:
                p.requires_grad_(True)
            others = [s for s in data.SKILLS if s != skill]
            mix = {skill: 1.0 - cfg["replay"], **{s: cfg["replay"] / len(others) for s in others}}
            steps, loss = _train(
                model,
                Batcher(tokenizer, seed=seed * 1000 + 20 + i),
                mix,
                steps=cfg["expert_steps"],
                batch=cfg["batch"],
                lr=cfg["expert_lr"],
                params=params,
            )
            report[f"{skill}_expert"] = (steps, loss, probe.accuracy(model))
            for p in model.parameters():
                p.requires_grad_(True)
            _save(model, tokenizer, paths[f"{skill}_expert"])

    elapsed = time.perf_counter() - t0
    for name, (steps, loss, acc) in report.items():
        accs = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
        print(f"  {name}: {steps} steps, last loss {loss:.3f}, probe acc {accs}", flush=True)
    print(
        f"built tiny example ({'quick' if quick else 'full'}, seed {seed}) in {elapsed:.1f}s -> {out_dir}",
        flush=True,
    )
    return paths


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="examples/tiny/models", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller, faster build (tests)")
    args = parser.parse_args(argv)
    paths = build_example(args.out, seed=args.seed, quick=args.quick)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    main()
