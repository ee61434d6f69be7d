"""System tests: the product as a user runs it: ``tlsweep`` and make in processes, mlflow servers, Keras Tuner's
chief and workers, ``GPUS=`` workers on a fake ``nvidia-smi``, the wheel, a headless browser, the real flowers, the
benchmarks end to end. A module sits at the level of its heaviest test."""

from __future__ import annotations

import pytest

from support import CHROMIUM, FLOWERS, missing


@pytest.fixture
def _flowers_present() -> None:
    if not FLOWERS.is_dir():
        missing(f"real data not found at {FLOWERS} (the shared flower_photos data set)")



@pytest.fixture
def chromium() -> str:
    """The headless browser's executable (Debian's chromium; `make install` installs it where apt-get exists)."""
    if CHROMIUM is None:
        missing("needs Chromium (`apt-get install chromium`, which `make install` runs) for a headless screenshot")
    return CHROMIUM

