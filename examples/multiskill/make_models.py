"""Build the multiskill example: a tokenizer, a base model and two fine-tunes of it.

The point of the example is a CPU-sized problem on which merging two fine-tunes *per
layer group* (different task-arithmetic weights in different layers) beats every
parent and the uniform merge, so that an evolutionary merge search has something real
to find.  Everything is synthetic and built on the CPU from fixed seeds:

* a byte-level BPE tokenizer (512 tokens, one token per digit) trained on pseudo-text
  and skill strings;
* ``base``: a 4-layer ``LlamaForCausalLM`` (hidden 256, MLP 512, ~2.9M parameters)
  trained on pseudo-text plus three digit skills (``copy``, ``shift``, ``rev``; see
  ``tasks/make_data.py``).  It follows a 1,500-step learning-rate schedule but stops at
  step 300, while ``shift`` and ``rev`` are only emerging;
* ``shift_expert`` / ``rev_expert``: ``base`` fine-tuned on one skill.  Embeddings,
  ``lm_head`` and all norms are frozen, so the task vectors live in the attention and
  MLP weights of the decoder layers, which is what the layer-wise merge weights act on
  (with those parts trainable, the part the two task vectors share sits in ``lm_head``
  and the final norm, and merges collapse).  30% of each expert's batches are the other
  skill's prompts answered by ``base`` itself (greedy generations: self-distillation),
  which limits forgetting without teaching the other skill.

Training only ever sees digit strings of the ``train`` split of
``tasks/make_data.py``; validation and test strings are never trained on.

Usage (from the repository root)::

    python examples/multiskill/make_models.py                 # -> examples/multiskill/models/
    python examples/multiskill/make_models.py --out /tmp/ms

The result is bit-identical across runs on the same machine and torch build (fixed
seeds, one intra-op thread while training).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
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
    """Import ``tasks/make_data.py`` (skills and the split) by file path."""
    name = "_evomerge_multiskill_make_data"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "tasks" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


data = _load_data_module()

# ``copy`` is trained into the base only: it teaches "read the digits after the skill
# word, then write digits" without being either evaluated skill.
APPLY = {**data.APPLY, "copy": lambda x: x}

MODEL_SHAPE = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}
BATCH = 32
# Base: the learning-rate schedule is that of a 1,500-step run, but training stops at
# step 300, so that both evaluated skills are only emerging (room for the experts).
BASE = {
    "lr": 1e-3,
    "schedule_steps": 1500,
    "stop_at": 300,
    "warmup": 30,
    "mix": {"text": 0.50, "copy": 0.10, "shift": 0.15, "rev": 0.25},
}
# Experts: own skill 70%, the other skill's prompts with the base's own answers 30%.
EXPERT = {
    "lr": 3e-4,
    "schedule_steps": 400,
    "stop_at": 400,
    "warmup": 20,
    "own": 0.7,
    "distill_pool": 4096,  # prompts of the other skill answered by the base
}
SEED = 0


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


# --------------------------------------------------------------------------- pseudo-text
class PseudoText:
    """Sentences over a made-up lexicon with first-order Markov structure.

    Plain language-model data for the base (half of its batches), so that the models
    are general next-token predictors and not only digit machines.  Each word has a few
    preferred successors, so there is structure to learn; no digits appear, so the text
    cannot leak any evaluated string.
    """

    def __init__(self, seed: int, n_words: int = 240, successors: int = 4):
        rng = random.Random(f"lexicon-{seed}")
        onsets = [
            "b",
            "d",
            "f",
            "g",
            "k",
            "l",
            "m",
            "n",
            "p",
            "r",
            "s",
            "t",
            "v",
            "z",
            "br",
            "st",
            "tr",
            "kl",
            "sh",
            "ch",
        ]
        vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
        codas = ["", "", "n", "r", "s", "l", "m", "k"]
        words: set[str] = set()
        while len(words) < n_words:
            words.add(
                "".join(
                    rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                    for _ in range(rng.choice((1, 1, 2, 2, 3)))
                )
            )
        # Sorted before shuffling: set order is not stable across processes.
        self.words = sorted(words)
        rng.shuffle(self.words)
        # Zipf-like word frequencies for sentence starts and random jumps.
        self.zipf = [1.0 / (r + 1) for r in range(n_words)]
        self.next = [rng.sample(range(n_words), successors) for _ in range(n_words)]
        self.next_weights = [8.0, 4.0, 2.0, 1.0][:successors]

    def sentence(self, rng: random.Random) -> str:
        n = rng.randint(5, 12)
        w = rng.choices(range(len(self.words)), self.zipf)[0]
        out = [self.words[w]]
        for _ in range(n - 1):
            # Mostly follow the chain; sometimes jump (keeps every word reachable).
            if rng.random() < 0.85:
                w = rng.choices(self.next[w], self.next_weights)[0]
            else:
                w = rng.choices(range(len(self.words)), self.zipf)[0]
            out.append(self.words[w])
        return " ".join(out).capitalize() + "."


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(text: PseudoText, seed: int):
    """Byte-level BPE with digits pre-tokenized one by one, wrapped for transformers.

    One token per digit keeps the skills position-wise simple and lets training build
    token ids directly.  No post-processor: ``encode`` adds no BOS, so lm-eval's HF
    backend scores exactly the token sequences the models were trained on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(f"tokenizer-{seed}")
    corpus = [text.sentence(rng) for _ in range(4000)]
    for _ in range(2000):
        skill = rng.choice(sorted(APPLY))
        x = data.random_digits(rng)
        corpus.append(data.prompt(skill, x) + APPLY[skill](x))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SHAPE["vocab_size"],
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
    """Random training sequences.

    * skill sequences ``<prompt><answer></s>``, loss on answer and ``</s>`` only;
    * pseudo-text ``<sentence></s>``, loss on every token;
    * ``distill:<skill>``: prompts of that skill with answers from a fixed pool
      (the base's own greedy generations), loss on the answer tokens.

    Digit strings are drawn from the ``train`` split only.
    """

    def __init__(self, tokenizer, text: PseudoText, seed: int, distill: dict | None = None):
        self.rng = random.Random(seed)
        self.tokenizer = tokenizer
        self.text = text
        self.distill = distill or {}
        vocab = tokenizer.get_vocab()
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        # Digits are single tokens, so ids are assembled directly (much faster than
        # calling the tokenizer per sample); checked against the tokenizer once here.
        self.digit = {c: vocab[c] for c in "0123456789"}
        self.equals = vocab["="]
        self.head = {s: tokenizer.encode(f"{s} ", add_special_tokens=False) for s in APPLY}
        for s in APPLY:
            x = "407192"
            assert self.prompt_ids(s, x) == tokenizer.encode(data.prompt(s, x), add_special_tokens=False), (
                "tokenizer does not split prompts as expected"
            )

    def prompt_ids(self, skill: str, x: str) -> list[int]:
        return self.head[skill] + [self.digit[c] for c in x] + [self.equals]

    def train_digits(self, rng: random.Random | None = None) -> str:
        while True:
            x = data.random_digits(rng or self.rng)
            if data.split_of(x) == "train":
                return x

    def sample(self, kind: str) -> tuple[list[int], list[int]]:
        if kind == "text":
            ids = self.tokenizer.encode(self.text.sentence(self.rng), add_special_tokens=False)
            ids = ids[: MODEL_SHAPE["max_position_embeddings"] - 1] + [self.eos]
            return ids, list(ids)
        if kind.startswith("distill:"):
            p, a = self.rng.choice(self.distill[kind.split(":", 1)[1]])
        else:
            x = self.train_digits()
            p = self.prompt_ids(kind, x)
            a = [self.digit[c] for c in APPLY[kind](x)] + [self.eos]
        return p + a, [-100] * len(p) + a

    def batch(self, mix: dict[str, float], size: int = BATCH):
        kinds = self.rng.choices(list(mix), list(mix.values()), k=size)
        seqs, labels = zip(*(self.sample(k) for k in kinds), strict=True)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in seqs])
        lab = torch.tensor([ls + [-100] * (width - len(ls)) for ls in labels])
        return ids, lab


@torch.no_grad()
def greedy(model, prompts: list[list[int]], eos: int, max_new: int = 8) -> list[list[int]]:
    """Greedy continuations (up to and including ``</s>``) of token-id prompts.

    Prompts are batched by length, so no padding is needed; the digits make all
    prompts of one skill and one length the same number of tokens.
    """
    model.eval()
    out: list[list[int] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        for start in range(0, len(idx), 256):
            chunk = idx[start : start + 256]
            ids = torch.tensor([prompts[i] for i in chunk])
            gen = torch.empty(len(chunk), 0, dtype=torch.long)
            done = torch.zeros(len(chunk), dtype=torch.bool)
            for _ in range(max_new):
                nxt = model(input_ids=torch.cat([ids, gen], 1)).logits[:, -1].argmax(-1)
                gen = torch.cat([gen, nxt[:, None]], 1)
                done |= nxt == eos
                if done.all():
                    break
            for row, i in enumerate(chunk):
                toks = gen[row].tolist()
                out[i] = toks[: toks.index(eos) + 1] if eos in toks else toks
    return out  # type: ignore[return-value]


class Probe:
    """Greedy exact match on TRAIN-split strings, printed to follow the build.

    The held-out validation and test strings are left to lm-eval.
    """

    def __init__(self, batcher: Batcher, seed: int, n: int = 200):
        rng = random.Random(f"probe-{seed}")
        self.batcher = batcher
        self.items = {}
        for skill in ("copy", *data.SKILLS):
            xs = [batcher.train_digits(rng) for _ in range(n)]
            self.items[skill] = (
                [batcher.prompt_ids(skill, x) for x in xs],
                [[batcher.digit[c] for c in APPLY[skill](x)] + [batcher.eos] for x in xs],
            )

    def exact_match(self, model) -> dict[str, float]:
        out = {}
        for skill, (prompts, answers) in self.items.items():
            gens = greedy(model, prompts, self.batcher.eos)
            out[skill] = sum(g == a for g, a in zip(gens, answers, strict=True)) / len(answers)
        return out


def _train(
    model, batcher: Batcher, mix: dict[str, float], params, *, lr: float, schedule_steps: int, stop_at: int, warmup: int
) -> float:
    """AdamW; linear warmup, then cosine decay to 0 at ``schedule_steps``; stops at
    ``stop_at``.  Returns the mean loss over the last 20 steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / (schedule_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses = []
    for _ in range(stop_at):
        ids, lab = batcher.batch(mix)
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def _schedule(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("lr", "schedule_steps", "stop_at", "warmup")}


def _expert_params(model):
    """Trainable in the fine-tunes: attention and MLP weights of the decoder layers."""
    return [p for n, p in model.named_parameters() if ".layers." in n and "norm" not in n]


def train_expert(
    model, tokenizer, text: PseudoText, batcher: Batcher, skill: str, *, seed: int, cfg: dict = EXPERT
) -> float:
    """Fine-tune ``model`` (holding the base weights) in place into the ``skill`` expert.

    Only the attention and MLP weights of the decoder layers train.  Returns the mean
    loss of the last 20 steps.
    """
    (other,) = [s for s in data.SKILLS if s != skill]
    # The other skill's prompts answered by the base itself (whatever it says, right or
    # wrong): keeps the expert's behaviour there close to the base's.
    pool = answered_by(model, batcher, other, cfg["distill_pool"], f"distill-{seed}-{skill}")
    expert_batcher = Batcher(tokenizer, text, seed=seed + 10, distill={other: pool})
    mix = {skill: cfg["own"], f"distill:{other}": 1.0 - cfg["own"]}
    return train_only(model, _expert_params(model), expert_batcher, mix, _schedule(cfg), seed)


def answered_by(model, batcher: Batcher, skill: str, count: int, rng_name: str) -> list[tuple[list[int], list[int]]]:
    """``count`` train-split prompts of ``skill`` (drawn by ``random.Random(rng_name)``), each
    with the model's own greedy answer: a self-distillation pool."""
    rng = random.Random(rng_name)
    prompts = [batcher.prompt_ids(skill, batcher.train_digits(rng)) for _ in range(count)]
    return list(zip(prompts, greedy(model, prompts, batcher.eos), strict=True))


def train_only(model, params, batcher: Batcher, mix: dict[str, float], schedule: dict, seed: int) -> float:
    """``_train`` with every parameter but ``params`` frozen (all trainable again afterwards)."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    loss = _train(model, batcher, mix, params, **schedule)
    for p in model.parameters():
        p.requires_grad_(True)
    return loss


# --------------------------------------------------------------------------- build
def build_example(out_dir: str | Path, *, seed: int = SEED) -> dict[str, Path]:
    """Build tokenizer, ``base``, ``shift_expert`` and ``rev_expert`` under ``out_dir``.

    Returns ``{"base": path, "shift_expert": path, "rev_expert": path}``; each path is a
    Hugging Face model folder (config.json, model.safetensors, generation_config.json,
    tokenizer files).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in MODEL_NAMES}

    with _deterministic_torch(seed):
        t0 = time.perf_counter()
        text = PseudoText(seed)
        tokenizer = train_tokenizer(text, seed)
        print(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - t0:.1f}s)", flush=True)
        config = LlamaConfig(
            **MODEL_SHAPE,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        batcher = Batcher(tokenizer, text, seed=seed * 1000 + 1)
        probe = Probe(batcher, seed)

        t0 = time.perf_counter()
        loss = _train(model, batcher, BASE["mix"], list(model.parameters()), **_schedule(BASE))
        _report("base", BASE["stop_at"], loss, probe.exact_match(model), time.perf_counter() - t0)
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save(model, tokenizer, paths["base"])

        for i, skill in enumerate(data.SKILLS):
            t0 = time.perf_counter()
            model.load_state_dict(base_state)
            loss = train_expert(model, tokenizer, text, batcher, skill, seed=seed * 1000 + 10 + i)
            _report(f"{skill}_expert", EXPERT["stop_at"], loss, probe.exact_match(model), time.perf_counter() - t0)
            _save(model, tokenizer, paths[f"{skill}_expert"])

    print(f"built multiskill example (seed {seed}) in {time.perf_counter() - t_start:.1f}s -> {out_dir}", flush=True)
    return paths


def _report(name: str, steps: int, loss: float, em: dict[str, float], seconds: float) -> None:
    accs = " ".join(f"{k}={v:.2f}" for k, v in em.items())
    print(
        f"  {name}: {steps} steps in {seconds:.1f}s, loss (last 20 steps) {loss:.3f},"
        f" train-split greedy exact match {accs}",
        flush=True,
    )


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def build_from_command_line(build, default_out: Path, doc: str, argv: list[str] | None) -> dict[str, Path]:
    """``--out`` and ``--seed`` from the command line, then ``build(out, seed=...)``; prints the
    folders built (shared with ``examples/layered/make_models.py``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", default=str(default_out), help="output folder")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard progress bars would drown the report
    paths = build(args.out, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    return build_from_command_line(build_example, HERE / "models", __doc__, argv)


if __name__ == "__main__":
    main()
