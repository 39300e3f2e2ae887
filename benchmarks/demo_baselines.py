"""Score the demo's parents, their uniform merge and the evolved final model with plain lm-eval.

    python benchmarks/demo_baselines.py [runs/demo]

Run from the repository root after ./dev demo. These are validation-set scores (the data the
search optimised), not held-out scores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import yaml


def main(storage: str) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path="examples/tiny/tasks", include_defaults=False)
    models = os.path.abspath("examples/tiny/models")
    uniform = tempfile.mkdtemp(prefix="uniform-")
    config = {
        "merge_method": "linear",
        "models": [
            {"model": f"{models}/shift_expert", "parameters": {"weight": 0.5}},
            {"model": f"{models}/rev_expert", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    config_path = os.path.join(uniform, "uniform.yml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    mergekit = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    subprocess.run([mergekit, config_path, os.path.join(uniform, "model")], check=True, capture_output=True)
    candidates = [
        ("base", f"{models}/base"),
        ("shift_expert", f"{models}/shift_expert"),
        ("rev_expert", f"{models}/rev_expert"),
        ("linear 0.5/0.5", os.path.join(uniform, "model")),
        ("evolved (final_model)", os.path.join(storage, "final_model")),
    ]
    print(f"{'model':24s} {'tiny_shift':>10s} {'tiny_rev':>9s} {'sum':>6s}")
    for name, path in candidates:
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": path, "dtype": "float32"}, device="cpu",
            tasks=["tiny_shift", "tiny_rev"], batch_size=16, bootstrap_iters=0, task_manager=manager,
        )["results"]
        a, b = results["tiny_shift"]["acc,none"], results["tiny_rev"]["acc,none"]
        print(f"{name:24s} {a:10.2f} {b:9.2f} {a + b:6.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
