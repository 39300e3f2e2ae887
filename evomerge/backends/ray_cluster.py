"""One Ray cluster per run: a private local one by default, or an existing one by address."""

from __future__ import annotations

import os

# Environment the Ray workers need: they run Prefect tasks that report to the same API server,
# and read models offline when the driver does.
_FORWARDED_ENV = (
    "PREFECT_API_URL", "PREFECT_API_KEY", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_DATASETS_CACHE", "PREFECT_LOGGING_LEVEL",
)


def connect_ray(address: str | None) -> bool:
    """Start or join the cluster; returns whether this process started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    kwargs = {"include_dashboard": False} if address is None else {}
    ray.init(
        address=address or "local",  # "local": never attach to somebody else's cluster
        runtime_env={"env_vars": env_vars} if env_vars else None,
        log_to_driver=False,
        configure_logging=False,
        **kwargs,
    )
    return True


def disconnect_ray(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        ray.shutdown()
