"""A stop request is remembered even when a library turns the KeyboardInterrupt into its own error."""

import os
import signal

import pytest

from evomerge import stop_request


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    stop_request._requested = False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raises_keyboard_interrupt_and_is_remembered(restore_handlers, sig):
    stop_request.install()
    assert not stop_request.requested()

    class LibraryError(Exception):
        pass

    with pytest.raises(LibraryError):
        try:
            os.kill(os.getpid(), sig)
        except KeyboardInterrupt as exc:  # what pydantic does inside Prefect's serialisation
            raise LibraryError("wrapped") from exc
    assert stop_request.requested()
