"""One Ray cluster per run: a private local one by default, or an existing one by address."""

from __future__ import annotations

import os

from evomerge import failpoints

# Environment the Ray workers need: they run Prefect tasks that report to the same API server,
# read models offline when the driver does, and fail where a fault-injection test armed them.
_FORWARDED_ENV = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_DATASETS_CACHE",
    "PREFECT_LOGGING_LEVEL",
    failpoints.ENV,
    failpoints.ONCE_DIR_ENV,
)


def connect_ray(address: str | None) -> bool:
    """Start or join the cluster; returns whether this process started it (and must stop it)."""
    if address is None:
        # A private cluster serves this machine only: with this switch (read when ray is first
        # imported) Ray takes 127.0.0.1 as the node address, so GCS and raylet listen on
        # loopback; _node_ip_address="127.0.0.1" would be rewritten to the public address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    kwargs = {}
    if address is None:
        kwargs["include_dashboard"] = False
        # Prefect tasks run in Ray worker processes that ask for no CPU (the slot actors hold
        # them all). Ray kills idle workers above its soft limit (the CPU count) after 1 s, and a
        # new worker spends seconds importing Prefect: measured here, up to 9 s of a 2 s
        # candidate. Keep idle workers for the run instead. (On an existing cluster, set
        # RAY_idle_worker_killing_time_threshold_ms where the cluster is started.)
        kwargs["_system_config"] = {"idle_worker_killing_time_threshold_ms": 3_600_000}
    try:
        ray.init(
            address=address or "local",  # "local": never attach to somebody else's cluster
            runtime_env={"env_vars": env_vars} if env_vars else None,
            log_to_driver=False,
            configure_logging=False,
            **kwargs,
        )
    except ConnectionError as exc:
        if address is None:
            raise
        raise ConnectionError(
            f"--ray-address {address}: could not join the Ray cluster ({exc}). Check that the "
            "cluster runs and the address is its head's GCS address (host:port of `ray start "
            "--head`). A cluster started by `ray start` uses token authentication by default "
            "(Ray 2.60), and Ray never sends a token to an explicit address unless told: set "
            "RAY_AUTH_MODE=token in evomerge's environment, with the head's token in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN"
        ) from exc
    return True


def disconnect_ray(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        ray.shutdown()
