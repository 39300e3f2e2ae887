"""Shared fixtures: tiny models built offline, the example's lm-eval tasks, a Prefect server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Never reach for the Hugging Face Hub: everything is built or shipped locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "examples" / "tiny" / "tasks"
sys.path.insert(0, str(REPO / "examples" / "tiny"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base, shift_expert, rev_expert: tiny Llama models (quick build, about 10 s)."""
    from make_models import build_example

    return build_example(tmp_path_factory.mktemp("models"), quick=True)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect server on loopback, shared by the tests that do not test the CLI's own."""
    from evomerge.backends.prefect_server import start_prefect_server

    server = start_prefect_server()
    yield server.api_url
    server.stop()


def write_config(path: Path, models: dict[str, Path], **overrides) -> Path:
    import yaml

    config = {
        "genome": {
            "models": [str(models["shift_expert"]), str(models["rev_expert"])],
            "base_model": str(models["base"]),
            "merge_method": "task_arithmetic",
            "layer_granularity": 2,
        },
        "tasks": [{"name": "tiny_shift"}, {"name": "tiny_rev"}],
        "limit": 24,
    }
    for key, value in overrides.items():
        if key == "genome":
            config["genome"].update(value)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path
