"""Ctrl-C and SIGTERM stop a sweep, and are remembered.

Python turns a signal into ``KeyboardInterrupt`` wherever the main thread is. When that is inside
TensorFlow (a tensor conversion, a traced function), TensorFlow can report it as an error of its own,
such as a dtype-conversion ``TypeError``. Keras Tuner would then count the trial as FAILED and go on
with the next one: the sweep would ignore the signal. ``interrupted()`` tells the tuner that whatever
the error says, the process was asked to stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_RECEIVED = threading.Event()
_HELD = {"depth": 0, "pending": None}  # inside ``held()``: the signal that arrived, raised when it ends


def interrupted() -> bool:
    """True once SIGINT or SIGTERM arrived inside ``stop_on_signals()``."""
    return _RECEIVED.is_set()


def interruption(error: BaseException) -> KeyboardInterrupt | None:
    """The interrupt behind ``error``: the error itself if it is one, a ``KeyboardInterrupt`` chained to it
    if a signal came first (TensorFlow reported it as an error of its own), else None."""
    if isinstance(error, KeyboardInterrupt):
        return error
    if not interrupted():
        return None
    stop = KeyboardInterrupt(f"interrupted; TensorFlow reported it as {type(error).__name__}: {error}")
    stop.__cause__ = error
    return stop


def _handler(signum: int, frame: object) -> None:
    _RECEIVED.set()
    if _HELD["depth"]:
        _HELD["pending"] = signal.Signals(signum).name
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A signal that arrives inside waits until the block ends, then stops the process as usual: a run being
    created is created whole and its id known, so that it can be closed as KILLED (a SIGTERM that landed inside
    MLflow's create_run once left a run RUNNING with nobody to close it)."""
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
    if not _HELD["depth"] and _HELD["pending"]:
        name, _HELD["pending"] = _HELD["pending"], None
        raise KeyboardInterrupt(name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` and set ``interrupted()``; handlers are restored after.

    A signal the process inherited as ignored stays ignored (``nohup``, background jobs of a shell).
    Outside the main thread, signals cannot be handled; nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _RECEIVED.clear()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) != signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
