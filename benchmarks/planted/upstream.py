"""Upstream ``mergekit-evolve`` (mergekit 0.1.4) in its own virtual environment, run on a planted
problem, its best score read at given evaluation counts from its own ``outcmaes/fit.dat``.

mergekit 0.1.4 is the last release whose ``mergekit-evolve`` starts (0.1.5's does not start with
current lm-eval); it needs transformers 4.57 and lm-eval 0.4.9.1, which cannot share evomerge's
environment. On a CPU-only machine two shims are applied by ``upstream_main.py`` (run inside that
environment) and nothing else is changed: torch 2.13 has no ``torch.cpu.empty_cache`` (mergekit's
actors call it after every candidate) and lm-eval's ``HFLM`` must be told ``device="cpu"``. Ray is
started locally with one fake GPU (mergekit's actors ask for ``num_gpus=1``). mergekit-evolve has
no seed option: pycma seeds numpy from the clock, so the shim passes ``seed`` into the options of
its one ``cma.fmin2`` call (nothing else in its search changes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "evomerge" / "upstream-mergekit-0.1.4"
# torch first and pinned (CPU wheel), then the rest in one resolver run.
REQUIREMENTS = (
    ("torch==2.13.0",),
    ("mergekit[evolve]==0.1.4", "transformers>=4.57,<4.58", "lm-eval==0.4.9.1"),  # [evolve] brings ray and cma
)
_MAIN = Path(__file__).with_name("upstream_main.py")


def ensure_venv(venv: Path = DEFAULT_VENV) -> Path:
    """Build the environment once (a few minutes); returns its python."""
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for group in REQUIREMENTS:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *group], check=True)
    subprocess.run([str(python), "-c", "import mergekit.scripts.evolve, lm_eval, ray, cma"], check=True)
    marker.touch()
    return python


def run(
    python: Path,
    config: Path,
    workdir: Path,
    max_fevals: int,
    seed: int,
    task_search_path: Path,
    log: Path,
    timeout: float = 3600,
) -> None:
    """One ``mergekit-evolve`` search in ``workdir`` (pycma writes ``outcmaes/`` there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TQDM_DISABLE": "1",
        "UPSTREAM_CMA_SEED": str(seed),
    }
    env.pop("VIRTUAL_ENV", None)
    command = [
        str(python),
        str(_MAIN),
        str(config),
        "--storage-path",
        str(workdir / "storage"),
        "--max-fevals",
        str(max_fevals),
        "--task-search-path",
        str(task_search_path),
        "--in-memory",
        "--no-merge-cuda",
        "--no-reshard",
        "--num-gpus",
        "1",
        # lm-eval's default batch of 1 makes each candidate 3x slower here; 16 is what
        # evomerge's slots use on a CPU (same scores, this is speed only).
        "--batch-size",
        "16",
    ]
    with open(log, "w") as out:
        subprocess.run(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=timeout)


def best_at(fit_dat: Path, evaluations: list[int]) -> dict[int, float]:
    """Best score found within each evaluation count, from pycma's ``fit.dat``.

    Columns: iteration, evaluations so far, sigma, axis ratio, best ever f, best f of the
    iteration, median, worst, ... f is pycma's minimised value, upstream's ``-score``. A count
    between two iterations takes the last iteration that fits in it (no partial generation)."""
    rows = np.loadtxt(fit_dat, comments="%", ndmin=2)
    result = {}
    for budget in evaluations:
        within = rows[rows[:, 1] <= budget]
        result[budget] = float(-within[:, 5].min()) if len(within) else float("nan")
    return result


def scores(workdir: Path) -> list[float | None]:
    """Every candidate's score in the order asked (logged by ``upstream_main.py``)."""
    return [json.loads(line) for line in (workdir / "scores.jsonl").read_text().splitlines()]


def sigmas(fit_dat: Path) -> list[float]:
    rows = np.loadtxt(fit_dat, comments="%", ndmin=2)
    return [float(s) for s in rows[:, 2]]


if __name__ == "__main__":
    print(ensure_venv())
