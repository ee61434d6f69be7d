"""Unit tests: our logic alone, in this process, in seconds: no process started, no TensorFlow training, no
MLflow store (integration/ has those; system/ runs the product as a user does)."""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture(autouse=True)
def _no_process(monkeypatch):
    """A unit test that starts a process belongs in system/: fail it at the call rather than let it slow the level."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a unit test started a process ({args[0] if args else kwargs.get('args')}); "
                             "move the test to tests/system")

    monkeypatch.setattr(subprocess, "Popen", refuse)
