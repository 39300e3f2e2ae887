"""On-disk merges with mergekit's ``run_merge``."""

from __future__ import annotations

from typing import Any

from evomerge.core.options import RunOptions


class DiskMerger:
    def __init__(self, options: RunOptions, use_cuda: bool):
        from mergekit.options import MergeOptions

        self.merge_options = MergeOptions(
            cuda=use_cuda,
            copy_tokenizer=True,
            trust_remote_code=options.trust_remote_code,
            allow_crimes=options.allow_crimes,
            random_seed=options.seed,  # dare's and della's random drops follow the run's seed
            quiet=True,
            out_shard_size=1_000_000_000_000,  # one shard: the fastest to load back
            safe_serialization=True,
            lazy_unpickle=True,
            write_model_card=False,  # a candidate folder lives for seconds; nobody reads it
        )

    def merge(self, merge_config: dict[str, Any], out_dir: str) -> None:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge

        run_merge(MergeConfiguration.model_validate(merge_config), out_dir, self.merge_options)
