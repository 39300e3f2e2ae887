"""A merge configuration as the YAML that ``mergekit-yaml`` takes (``best_config.yaml``, the UI)."""

from __future__ import annotations

from typing import Any

import yaml

from evomerge.core.records import CandidateRecord
from evomerge.core.storage_layout import BEST_CONFIG


def merge_config_yaml(merge_config: dict[str, Any]) -> str:
    return yaml.safe_dump(merge_config, sort_keys=False, default_flow_style=None)


def best_config_yaml(record: CandidateRecord) -> str:
    header = (
        f"# evomerge best merge: fitness {record.score:.6f} "
        f"(generation {record.generation}, candidate {record.index}, key {record.key})\n"
        f"# merge it with: mergekit-yaml {BEST_CONFIG} OUTPUT_FOLDER\n"
    )
    return header + merge_config_yaml(record.merge_config)
