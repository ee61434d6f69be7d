"""Skips that cannot hide: a test missing its real data or browser skips on a developer's machine but FAILS in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
PROBE = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from support import missing

def test_needs_something_absent():
    missing("real data not found at /nowhere")
"""


@pytest.mark.parametrize("ci, outcome", [("true", "1 failed"), ("", "1 skipped")])
def test_a_missing_requirement_fails_in_ci_and_skips_elsewhere(tmp_path, ci, outcome):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in out.stdout, out.stdout
    assert "real data not found at /nowhere" in out.stdout
    if ci:
        assert "CI (CI=true) must provide it: run `make install`" in out.stdout


def test_make_install_provides_chromium_where_apt_get_exists():
    makefile = (TESTS.parent / "Makefile").read_text()
    recipe = makefile[makefile.index("\ninstall:"):makefile.index("\ntest:")]
    assert "command -v apt-get" in recipe and "apt-get install -y -qq chromium" in recipe
