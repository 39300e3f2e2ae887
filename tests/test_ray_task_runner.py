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
