"""Run a command that must not outlive its parent: ``python -m evomerge.backends.orphan_guard
PARENT_PID COMMAND...``.

The private Prefect server runs in its own session (so that Ctrl-C in the terminal reaches
evomerge first and evomerge stops the server in order). If evomerge is killed with SIGKILL it
cannot stop the server; this guard, the server's parent, notices within a second that its own
parent is gone and stops the whole process group it leads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    child = subprocess.Popen(command)

    def forward_sigterm(signum, frame) -> None:
        child.terminate()

    signal.signal(signal.SIGTERM, forward_sigterm)
    while child.poll() is None:
        if os.getppid() != parent:  # re-parented: evomerge died without stopping us
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
            break
        time.sleep(0.5)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
