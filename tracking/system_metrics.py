"""MLflow's own system metrics (CPU, memory, disk, network, and GPU when there is one) on a trial's run
while it trains: ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``, ...

The metrics are the machine's, not one process's, so the sweep's process samples them for a trial that
runs in a fresh process too. One sample every ``TLSWEEP_SYSTEM_METRICS_SECONDS`` (default 5; 0 turns it
off) on a background thread: a few psutil calls and one batched write per sample, nothing on the
training thread. The run may still be queued for creation (``tracking.journal``): sampling starts once
it exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import Future
from typing import Iterator

from pipeline.errors import UserError

DEFAULT_SECONDS = 5.0
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "Started monitoring" lines per trial


def sampling_seconds() -> float:
    """``TLSWEEP_SYSTEM_METRICS_SECONDS``: seconds between samples, 0 for none."""
    raw = os.environ.get("TLSWEEP_SYSTEM_METRICS_SECONDS", str(DEFAULT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise UserError(f"TLSWEEP_SYSTEM_METRICS_SECONDS={raw!r} is not a number of seconds >= 0 (default "
                        f"{DEFAULT_SECONDS:g}; 0 turns system metrics off)")
    return seconds


_finishing: list[threading.Thread] = []  # monitors being stopped off the training thread
_lock = threading.Lock()


@contextlib.contextmanager
def monitored(run: Future | str) -> Iterator[None]:
    """Sample system metrics into ``run`` (a run id, or the future of one) while the block runs. Leaving
    the block does not wait for the last write (``drain`` does): the next trial starts at once."""
    seconds = sampling_seconds()
    if not seconds:
        yield
        return
    stop, started = threading.Event(), []

    def begin() -> None:
        try:
            run_id = run.result() if isinstance(run, Future) else run
        except Exception:  # noqa: BLE001 - the run could not be created: the trial reports that itself
            return
        if not stop.is_set():
            monitor = _monitor_class()(run_id, sampling_interval=seconds, samples_before_logging=1)
            monitor.start()
            started.append(monitor)

    def finish() -> None:
        starter.join(60)
        for monitor in started:
            monitor.finish()

    starter = threading.Thread(target=begin, daemon=True, name="tlsweep-system-metrics")
    starter.start()
    try:
        yield
    finally:
        stop.set()
        finisher = threading.Thread(target=finish, daemon=True, name="tlsweep-system-metrics-finish")
        finisher.start()
        with _lock:
            _finishing[:] = [t for t in _finishing if t.is_alive()] + [finisher]


def drain(timeout: float = 60.0) -> None:
    """Wait until every trial's last system-metrics sample is written (before a sweep reports or exits)."""
    with _lock:
        pending, _finishing[:] = list(_finishing), []
    for thread in pending:
        thread.join(timeout)


def _monitor_class() -> type:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class TrialMonitor(SystemMetricsMonitor):
        """MLflow's monitor, which drops the samples taken since its last write when it stops: a trial
        shorter than one interval would have none. This one writes them."""

        def finish(self) -> None:
            super().finish()
            try:
                if metrics := self.aggregate_metrics():
                    self.publish_metrics(metrics)
                    self.mlflow_logger.flush()
            except Exception:  # noqa: BLE001 - system metrics are never worth failing a trial
                pass

    return TrialMonitor
