"""MLflow's own system metrics (CPU, memory, disk, network, and GPU when there is one) of a trial, sampled while it
trains: ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``, ...

The metrics are the machine's, not one process's, so the sweep's process samples them for a trial that
runs in a fresh process too. One sample every ``TLSWEEP_SYSTEM_METRICS_SECONDS`` (default 5; 0 turns it
off) on a background thread: a few psutil calls through MLflow's own monitors, kept in memory. They reach MLflow with
the trial's record (``tracking.recorder``), in its batches after the trial's own metrics: no write, and no run lookup,
per sample (MLflow's ``SystemMetricsMonitor`` makes both every interval), and the run's first metric stays its
``val_accuracy`` (the default axis of MLflow's compare page).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator

from pipeline.settings import environment

logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "Skip logging GPU metrics" per trial
PREFIX = "system/"  # MLflow's prefix of system metrics


def sampling_seconds() -> float:
    """``TLSWEEP_SYSTEM_METRICS_SECONDS``: seconds between samples, 0 for none."""
    return environment().system_metrics_seconds


@contextlib.contextmanager
def sampled(into: list[tuple[str, float, int, int]]) -> Iterator[None]:
    """While the block runs, one sample per interval, and a last one when it ends (a trial shorter than one
    interval has one too), appended to ``into`` as ``(name, value, step, timestamp in ms)``."""
    seconds = sampling_seconds()
    if not seconds:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor("", sampling_interval=seconds)  # for its monitors only: it writes nothing here
    stop = threading.Event()

    def sample() -> None:
        step, done = 0, False
        while not done:
            try:
                for m in monitor.monitors:
                    m.collect_metrics()
                done = stop.wait(seconds)
                now = int(time.time() * 1000)
                into.extend((PREFIX + k, float(v), step, now) for k, v in monitor.aggregate_metrics().items())
                for m in monitor.monitors:
                    m.clear_metrics()
            except Exception:  # noqa: BLE001 - system metrics are never worth failing a trial
                return
            step += 1

    thread = threading.Thread(target=sample, name="tlsweep-system-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
