"""Deterministic data for the multiskill example: the skills, the train / validation /
test split of digit strings, and the lm-eval JSONL files.

Skills (``x`` is a string of 3-6 digits); the answer follows ``=`` directly:

* ``shift x=`` -> each digit plus one, mod 10   (``shift 4829=`` -> ``5930``)
* ``rev x=``   -> the digits reversed           (``rev 4829=``   -> ``9284``)

Every digit string belongs to exactly one split, decided by a stable hash
(:func:`split_of`): about 3/4 train, 1/8 validation, 1/8 test.  ``make_models.py``
trains only on train strings; the lm-eval validation items (the search's fitness) come
only from validation strings and the test items (held out from the search) only from
test strings, so no evaluated prompt is ever trained on and validation and test are
disjoint.  Both are balanced over the lengths 3-6 (50 resp. 125 items per length and
skill), so they measure the same thing.

Run from anywhere::

    python examples/multiskill/tasks/make_data.py   # (re)writes tasks/data/*.jsonl

The output is byte-identical on every run.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SKILLS = ("shift", "rev")
MIN_DIGITS, MAX_DIGITS = 3, 6
SIZES = {"validation": 200, "test": 500}
DATA_SEED = 4321
# Salt of the split hash.  With it the test split holds 137 of the 1,000 three-digit
# strings, enough for 125 distinct 3-digit test items per skill.
SPLIT_SALT = b"multiskill-0:"
DATA_DIR = Path(__file__).resolve().parent / "data"


def shift(x: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in x)


def rev(x: str) -> str:
    return x[::-1]


APPLY = {"shift": shift, "rev": rev}


def prompt(skill: str, x: str) -> str:
    """The text before the answer, e.g. ``"rev 482="``."""
    return f"{skill} {x}="


def split_of(x: str) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` for a digit string, by a stable hash.

    The split depends only on the string (not on the skill), so a held-out string is
    never trained on under any skill.
    """
    h = hashlib.sha256(SPLIT_SALT + x.encode()).digest()
    if h[0] % 4:
        return "train"
    return "validation" if h[1] % 2 == 0 else "test"


def random_digits(rng: random.Random) -> str:
    n = rng.randint(MIN_DIGITS, MAX_DIGITS)
    return "".join(rng.choice("0123456789") for _ in range(n))


def items(skill: str, split: str, n: int | None = None, seed: int = DATA_SEED) -> list[dict]:
    """``n`` distinct items of ``skill`` from ``split`` strings, ``n / 4`` per length."""
    n = SIZES[split] if n is None else n
    lengths = range(MIN_DIGITS, MAX_DIGITS + 1)
    per_length = n // len(lengths)
    rng = random.Random(f"{seed}-{skill}-{split}")
    out: list[dict] = []
    for length in lengths:
        seen: set[str] = set()
        while len(seen) < per_length:
            x = "".join(rng.choice("0123456789") for _ in range(length))
            if x in seen or split_of(x) != split:
                continue
            seen.add(x)
            out.append({"prompt": prompt(skill, x), "input": x, "answer": APPLY[skill](x)})
    # Mixed lengths in file order (lm-eval re-sorts anyway, but people read the files).
    rng.shuffle(out)
    return out


def write_data(out_dir: str | Path = DATA_DIR) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for skill in SKILLS:
        for split in SIZES:
            path = out_dir / f"{skill}_{split}.jsonl"
            with path.open("w", encoding="utf-8", newline="\n") as f:
                for item in items(skill, split):
                    f.write(json.dumps(item, sort_keys=True) + "\n")
            paths.append(path)
    return paths


if __name__ == "__main__":
    for path in write_data():
        print(f"wrote {path}")
