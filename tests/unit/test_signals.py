"""Ctrl-C and SIGTERM stop a sweep; inside ``signals.held()`` they wait until the block ends (a run being created is
created whole, so that it can be closed as KILLED)."""

import os
import signal
import time

import pytest

from sweeps import signals


def _signal_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handler runs here, in the main thread


def test_a_signal_stops_at_once_outside_held_and_after_the_block_inside_it():
    reached = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with signals.stop_on_signals():
            _signal_self()
            reached.append("after the signal")
    assert not reached and signals.interrupted()

    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with signals.stop_on_signals():
            with signals.held():
                _signal_self()
                reached.append("the block ran to its end")
            reached.append("after the block")
    assert reached == ["the block ran to its end"] and signals.interrupted()
