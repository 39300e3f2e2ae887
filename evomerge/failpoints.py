"""Fail points: named places where a test makes a real evomerge process fail.

Crash safety is only proven by crashing real processes at the worst moments (after ``ask``, with
candidates in flight, halfway through a checkpoint write, right after ``tell``, inside a slot
worker). The code marks those moments with ``failpoint("name")``; a test arms some of them for a
process through the environment, as etcd's gofail or TiKV's fail-rs do::

    EVOMERGE_FAILPOINTS="after-tell@2=kill,slot-evaluate=hang"

``name=action`` fires every time the point is reached, ``name@N=action`` only the N-th time in
this process. A point reached with a ``subject`` (``failpoint("slot-evaluate", "0.1")``, the
candidate's generation and index) can also be armed for that subject only, ``name:subject``;
several candidates can so meet different faults in one run, deterministically. Actions: ``kill``
(SIGKILL this process: no cleanup, no finally), ``raise`` (RuntimeError), ``hang`` (sleep for a
day), ``sleep:SECONDS``. With ``EVOMERGE_FAILPOINT_DIR`` set, each armed point fires at most
once across all processes sharing that folder (a restarted Ray actor inherits the environment;
it must not die again). Unarmed, a fail point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

ENV = "EVOMERGE_FAILPOINTS"
ONCE_DIR_ENV = "EVOMERGE_FAILPOINT_DIR"

_hits: Counter[str] = Counter()


def _armed() -> dict[str, tuple[int | None, str]]:
    spec = os.environ.get(ENV, "")
    armed: dict[str, tuple[int | None, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, action = item.partition("=")
        name, _, nth = point.partition("@")
        armed[name] = (int(nth) if nth else None, action or "raise")
    return armed


def failpoint(name: str, subject: str | None = None) -> None:
    armed = _armed()
    if subject is not None and f"{name}:{subject}" in armed:
        name = f"{name}:{subject}"
    elif name not in armed:
        return
    _hits[name] += 1
    nth, action = armed[name]
    if nth is not None and _hits[name] != nth:
        return
    once_dir = os.environ.get(ONCE_DIR_ENV)
    if once_dir:
        try:
            os.close(os.open(os.path.join(once_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        time.sleep(86_400)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    else:
        raise RuntimeError(f"fail point {name} fired")
