"""carso_cli.training.signals: ``StopSignal`` turns Ctrl-C / SIGTERM into a request to stop after the batch."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from carso_cli import training as tr


def _deliver(sig: signal.Signals) -> None:
    """Send ``sig`` to this process and give Python the chance to run its handler (main thread)."""
    os.kill(os.getpid(), sig)
    for _ in range(100):  # the handler runs at the next bytecode boundary; a short wait covers any delay
        time.sleep(0.001)


@pytest.fixture
def sentinel_handlers() -> Iterator[dict[int, Any]]:
    """Known handlers for SIGINT/SIGTERM before the test (so restoring them can be checked), then the originals."""
    original = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    sentinels: dict[int, Any] = {}
    for sig in original:

        def handler(signum: int, frame: Any) -> None:
            raise AssertionError(f"previous handler of {signal.Signals(signum).name} ran")

        sentinels[sig] = handler
        signal.signal(sig, handler)
    try:
        yield sentinels
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def test_sigterm_is_a_request_not_a_kill(sentinel_handlers: dict[int, Any]) -> None:
    with tr.StopSignal() as stop:
        assert stop.requested is None
        _deliver(signal.SIGTERM)
        assert stop.requested == "SIGTERM"  # still alive: the loop finishes its batch and checkpoints
        _deliver(signal.SIGTERM)  # a repeated SIGTERM is still only a request
        assert stop.requested == "SIGTERM"
    for sig, handler in sentinel_handlers.items():
        assert signal.getsignal(sig) is handler


def test_first_ctrl_c_requests_a_stop_second_aborts(sentinel_handlers: dict[int, Any]) -> None:
    with pytest.raises(KeyboardInterrupt), tr.StopSignal() as stop:
        _deliver(signal.SIGINT)
        assert stop.requested == "SIGINT"
        _deliver(signal.SIGINT)
        pytest.fail("a second Ctrl-C must abort")
    for sig, handler in sentinel_handlers.items():  # restored even when leaving through the exception
        assert signal.getsignal(sig) is handler


def test_second_sigint_after_sigterm_aborts(sentinel_handlers: dict[int, Any]) -> None:
    with pytest.raises(KeyboardInterrupt), tr.StopSignal() as stop:
        _deliver(signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        _deliver(signal.SIGINT)
    for sig, handler in sentinel_handlers.items():
        assert signal.getsignal(sig) is handler
