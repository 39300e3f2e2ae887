"""Deterministic data for the tiny example: the two skills, the train/held-out split
and the lm-eval validation sets.

Skills (``x`` is a string of 3-5 digits):

* ``shift x=`` -> each digit plus one, mod 10   (``shift 4829=`` -> ``5930``)
* ``rev x=``   -> the digits reversed           (``rev 4829=``   -> ``9284``)

Every digit string is assigned to either the training split or the held-out split
by a stable hash (:func:`is_heldout`).  ``make_models.py`` trains only on training
strings; the validation items below are drawn only from held-out strings, so no
validation prompt is ever seen in training.

Run from anywhere::

    python examples/tiny/tasks/make_data.py          # (re)writes tasks/data/*.jsonl

The output is byte-identical on every run.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SKILLS = ("shift", "rev")
MIN_DIGITS, MAX_DIGITS = 3, 5
N_VALIDATION = 100
DATA_SEED = 1234
DATA_DIR = Path(__file__).resolve().parent / "data"


def shift(x: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in x)


def rev(x: str) -> str:
    return x[::-1]


APPLY = {"shift": shift, "rev": rev}


def prompt(skill: str, x: str) -> str:
    """The text before the answer, e.g. ``"rev 482="``."""
    return f"{skill} {x}="


def is_heldout(x: str) -> bool:
    """Stable ~1/8 split of digit strings that training never sees."""
    return hashlib.sha256(x.encode()).digest()[0] % 8 == 0


def random_digits(rng: random.Random) -> str:
    n = rng.randint(MIN_DIGITS, MAX_DIGITS)
    return "".join(rng.choice("0123456789") for _ in range(n))


def _swap_two(y: str, rng: random.Random) -> str | None:
    """``y`` with two positions holding different digits swapped (a near miss)."""
    pairs = [(i, j) for i in range(len(y)) for j in range(i + 1, len(y)) if y[i] != y[j]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    s = list(y)
    s[i], s[j] = s[j], s[i]
    return "".join(s)


def make_item(skill: str, x: str, rng: random.Random) -> dict | None:
    """One multiple-choice item, or None when the four choices would not be distinct.

    Choices: the correct answer, the other skill's answer, the input unchanged, and
    the correct answer with two digits swapped (a near miss).
    """
    other = "rev" if skill == "shift" else "shift"
    correct = APPLY[skill](x)
    near = _swap_two(correct, rng)
    if near is None:
        return None
    choices = [correct, APPLY[other](x), x, near]
    if len(set(choices)) != 4:
        return None
    order = list(range(4))
    rng.shuffle(order)
    shuffled = [choices[k] for k in order]
    return {
        "prompt": prompt(skill, x),
        "input": x,
        "choices": shuffled,
        "label": shuffled.index(correct),
    }


def validation_items(skill: str, n: int = N_VALIDATION, seed: int = DATA_SEED) -> list[dict]:
    rng = random.Random(f"{seed}-{skill}")
    items: list[dict] = []
    seen: set[str] = set()
    while len(items) < n:
        x = random_digits(rng)
        if x in seen or not is_heldout(x):
            continue
        item = make_item(skill, x, rng)
        if item is None:
            continue
        seen.add(x)
        items.append(item)
    return items


def write_validation(out_dir: str | Path = DATA_DIR) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for skill in SKILLS:
        path = out_dir / f"{skill}_validation.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for item in validation_items(skill):
                f.write(json.dumps(item, sort_keys=True) + "\n")
        paths[skill] = path
    return paths


if __name__ == "__main__":
    for skill, path in write_validation().items():
        print(f"{skill}: wrote {path}")
