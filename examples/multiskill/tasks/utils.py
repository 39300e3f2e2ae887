"""Metrics for the multiskill lm-eval tasks (referenced by the YAMLs as
``!function utils.process_results``).

Per item, from the greedy generation (already cut at the first newline or ``</s>``):

* ``exact_match``: 1 if the stripped generation equals the answer, else 0;
* ``char_acc``: fraction of the answer's characters that the stripped generation has
  at the same position (0 for an empty generation; characters beyond the answer's
  length are ignored, so an over-long answer still loses its exact match);
* ``score``: ``exact_match + 0.5 * char_acc``, the search's fitness: exact match
  dominates, while the character accuracy gives partial credit that keeps the fitness
  landscape smooth between merge recipes.

All three are mean-aggregated and higher is better.
"""

from __future__ import annotations


def char_accuracy(prediction: str, answer: str) -> float:
    if not prediction or not answer:
        return 0.0
    return sum(p == a for p, a in zip(prediction, answer, strict=False)) / len(
        answer
    )  # a short prediction misses the rest


def item_metrics(prediction: str, answer: str) -> dict[str, float]:
    prediction, answer = prediction.strip(), answer.strip()
    exact = float(prediction == answer)
    char_acc = char_accuracy(prediction, answer)
    return {"exact_match": exact, "char_acc": char_acc, "score": exact + 0.5 * char_acc}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return item_metrics(results[0], doc["answer"])
