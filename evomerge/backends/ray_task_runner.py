"""prefect-ray's ``RayTaskRunner``, with what every task of a run shares built once per Ray worker.

For every task, prefect-ray sends the submitting flow's serialized context to a Ray worker, and
Prefect's task engine there

- rebuilds Prefect's ``Settings`` from it: pydantic-settings re-reads every source (environment,
  dotenv, TOML) for each of about 50 nested settings models, 120-140 ms per task on a 2-core CPU;
- opens two new API clients, each building an SSL context (certificate store included) even for
  the loopback ``http://`` server, 20-50 ms each.

Measured: a Prefect task on Ray took 240 ms against 8 ms for a plain Ray task calling the same
actor; 134 ms with the settings built once. The settings and the client are the same for every
task of a run, so each worker process builds them once (settings by a hash of the serialized
ones) and makes them current for each task; everything else is prefect-ray's own path.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect_ray import RayTaskRunner as _PrefectRayTaskRunner

# Settings built in this (Ray worker) process, by a hash of the serialized settings they came from.
_BUILT_SETTINGS: dict[str, Any] = {}


def _str_keys(value: Any) -> Any:
    """The same data with every dict key a string (Prefect 3.7 keys a profile's settings by
    ``Setting`` objects, which ``json.dumps`` refuses)."""
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_str_keys(v) for v in value]
    return value


def _with_built_settings(context: dict[str, Any]) -> dict[str, Any]:
    serialized = context.get("settings_context")
    if not serialized or not isinstance(serialized.get("settings"), dict):
        return context
    key = hashlib.sha256(json.dumps(_str_keys(serialized), sort_keys=True, default=str).encode()).hexdigest()
    if key not in _BUILT_SETTINGS:
        from prefect.context import SettingsContext

        _BUILT_SETTINGS[key] = SettingsContext(**serialized).settings
    return {**context, "settings_context": {**serialized, "settings": _BUILT_SETTINGS[key]}}


# The open API client context of this (Ray worker) process, by API URL.
_CLIENTS: dict[str, Any] = {}


@contextmanager
def _shared_client() -> Iterator[None]:
    """Make this process's one open ``SyncClientContext`` the current one for a task: Prefect's
    ``get_client(sync_client=True)`` then returns its client instead of building one."""
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or ""
    if url not in _CLIENTS:
        context = SyncClientContext()
        # Entered once (the client opened, the server's version checked) and never left, in a
        # copy of the current context so that it is current only where set below.
        contextvars.copy_context().run(context.__enter__)
        _CLIENTS[url] = context
    token = SyncClientContext.__var__.set(_CLIENTS[url])
    try:
        yield
    finally:
        SyncClientContext.__var__.reset(token)


class RayTaskRunner(_PrefectRayTaskRunner):
    @staticmethod
    def _run_prefect_task(
        *upstream_ray_obj_refs: Any, task, task_run_id, context, parameters, wait_for=None, dependencies=None
    ) -> Any:
        with _shared_client():
            return _PrefectRayTaskRunner._run_prefect_task(
                *upstream_ray_obj_refs,
                task=task,
                task_run_id=task_run_id,
                context=_with_built_settings(context),
                parameters=parameters,
                wait_for=wait_for,
                dependencies=dependencies,
            )
