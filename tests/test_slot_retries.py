"""run_on_slot against real Ray actors that die in the worst places: the retry count is bounded
and each death is counted once, whichever of the candidate's calls sees it.

The actors are small stand-ins for SlotWorker (this layer's unit test: what is under test is how
run_on_slot reads Ray's errors, not evaluation); they run on the session's two-node test cluster,
driven from a subprocess so that this pytest process never joins a Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    from types import SimpleNamespace

    import ray

    from evomerge.backends.slot_pool import CandidatePolicy, SlotRef, run_on_slot
    from evomerge.core.records import EvaluationOutcome

    address, marker_dir = sys.argv[1], sys.argv[2]
    ray.init(address=address, namespace="slot-retries", log_to_driver=False)

    @ray.remote(max_restarts=-1, num_cpus=0, max_concurrency=1)
    class Worker:
        def __init__(self, behaviour):
            self.behaviour = behaviour

        def _once(self, name):
            try:
                os.close(os.open(os.path.join(marker_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                return False

        def describe(self):
            # The process dies before the describe's answer reaches the caller: what a candidate
            # that kills its worker the instant it starts looks like from run_on_slot.
            if self.behaviour == "dies-before-ready-once" and self._once("ready"):
                os._exit(1)
            return {}

        def run(self, request):
            if self.behaviour == "always-dies":
                os._exit(1)
            if self.behaviour == "hangs-once" and self._once("hang"):
                time.sleep(3600)
            return EvaluationOutcome(status="ok", slot=self.behaviour)

    policy = CandidatePolicy(timeout=5.0, retries=2, worker_start_timeout=60.0)
    request = SimpleNamespace(generation=0, index=1)
    results = {}
    for behaviour in ("dies-before-ready-once", "always-dies", "hangs-once"):
        actor = Worker.options(name=behaviour).remote(behaviour)
        ray.get(actor.__ray_ready__.remote())
        slot = SlotRef(behaviour, behaviour, "slot-retries")
        first = run_on_slot(slot, request, policy)
        after = run_on_slot(slot, request, policy)  # the same slot, right after
        results[behaviour] = {
            "first": first.model_dump(include={"status", "attempts", "worker_deaths", "error"}),
            "after": after.model_dump(include={"status", "attempts", "worker_deaths"}),
        }
        ray.kill(actor, no_restart=True)
    print("RESULTS", json.dumps(results), flush=True)
    """
)


def test_each_death_under_a_candidate_is_counted_once_and_retries_are_bounded(ray_cluster, tmp_path):
    driver = subprocess.run(
        [sys.executable, "-c", DRIVER, ray_cluster.address, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert driver.returncode == 0, driver.stderr[-4000:]
    # Ray's own log lines share stdout; the driver marks its line.
    (line,) = [line for line in driver.stdout.splitlines() if line.startswith("RESULTS ")]
    results = json.loads(line.removeprefix("RESULTS "))

    # A worker that died with the describe's answer in flight died under this candidate: one
    # death, the retry scores it. (Read as "not ready yet", a candidate that kills its worker at
    # once would be retried without end and never counted.)
    died_before_ready = results["dies-before-ready-once"]["first"]
    assert died_before_ready["status"] == "ok" and died_before_ready["attempts"] == 2
    assert len(died_before_ready["worker_deaths"]) == 1
    assert died_before_ready["worker_deaths"][0].startswith(("ActorDiedError", "ActorUnavailableError"))

    always = results["always-dies"]["first"]
    assert always["status"] == "failed" and always["attempts"] == 3 and len(always["worker_deaths"]) == 3
    assert "died 3 times under this candidate (--worker-retries 2)" in always["error"]

    hung = results["hangs-once"]["first"]
    assert hung["status"] == "failed" and hung["attempts"] == 1 and not hung["worker_deaths"]
    assert "timed out after 5 s (--candidate-timeout)" in hung["error"] and "restarted" in hung["error"]
    # The timed-out candidate handed its slot back restarted: the next candidate finds it ready
    # and is not charged a death for the restart.
    assert results["hangs-once"]["after"] == {"status": "ok", "attempts": 1, "worker_deaths": []}


def test_an_error_inside_a_ray_task_is_recorded_by_its_own_type_and_message():
    """Ray wraps an error raised in a task; the wrapper's first line names only the task (a
    --vllm run recorded "ray::merge-and-evaluate()" for every candidate): the record names the
    error inside, as Ray re-raises it (``as_instanceof_cause``) and as it arrives."""
    from ray.exceptions import RayTaskError

    from evomerge.core.records import error_summary

    try:
        raise TypeError("keys must be str, int, float, bool or None, not Setting")
    except TypeError as cause:
        wrapped = RayTaskError("merge-and-evaluate", "ray::merge-and-evaluate() (pid=1)", cause)
    for error in (wrapped, wrapped.as_instanceof_cause()):
        assert error_summary(error).startswith("TypeError: keys must be str, int, float, bool or None, not Setting")
