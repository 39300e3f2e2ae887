"""The Ray task runner builds the run's Prefect settings once per worker process, equal to the
ones Prefect builds from the same serialized context."""

from prefect.context import SettingsContext

from evomerge.backends.ray_task_runner import _with_built_settings


def test_settings_are_built_once_and_equal_prefects_own():
    serialized = SettingsContext.get().serialize()
    context = {"settings_context": serialized, "tags_context": {"current_tags": ["a"]}}
    first, second = _with_built_settings(context), _with_built_settings(dict(context))
    built = first["settings_context"]["settings"]
    assert built is second["settings_context"]["settings"], "built once, reused"
    assert built.model_dump() == SettingsContext(**serialized).settings.model_dump()
    assert first["tags_context"] == context["tags_context"] and context["settings_context"] is serialized
    assert SettingsContext(**first["settings_context"]).settings is built, "Prefect takes the built object as is"
    assert _with_built_settings({"flow_run_context": {}}) == {"flow_run_context": {}}


def test_tasks_of_a_worker_share_one_open_api_client(prefect_api):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from evomerge.backends.ray_task_runner import _shared_client

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        with _shared_client():
            first = get_client(sync_client=True)
            assert first.hello().status_code == 200, "an open client of the run's server"
        with _shared_client():
            assert get_client(sync_client=True) is first, "the next task gets the same client"
        assert get_client(sync_client=True) is not first, "outside a task, Prefect's own behaviour"
