"""`make serve` installs only the runtime dependencies; `make test` adds the dev extra (scripts/install.sh modes).

The venv's interpreter is a stand-in that records its arguments (so pip never runs): the test reads which
installs `make` asked for, and which stamps it left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.serverproc import ROOT

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
exit 0
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The Makefile, installer and dependency list, with a venv whose python only logs its calls."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for rel in ("Makefile", "pyproject.toml", "scripts/install.sh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def _make(checkout: Path, *targets: str) -> list[str]:
    """Run make; return the pip installs the fake interpreter was asked for since the last call."""
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    out = subprocess.run(["make", "--no-print-directory", *targets], cwd=checkout, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return [c for c in calls if c.startswith("-m pip install")]


def test_serve_installs_runtime_only_and_test_adds_the_dev_extra(checkout: Path) -> None:
    venv = checkout / ".venv"
    # `make venv` is the install step of `make serve` (which then runs the entrypoint)
    assert _make(checkout, "venv") == ["-m pip install -e ."], "make serve must not install an extra"
    assert (venv / ".installed-runtime").exists() and not (venv / ".installed-dev").exists()
    assert _make(checkout, "venv") == [], "an up-to-date runtime install is not redone"
    serve = subprocess.run(["make", "-n", "serve"], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert "install.sh" not in serve.stdout and "entrypoint.sh" in serve.stdout, serve.stdout

    # the runtime stamp does not stand in for the dev install
    assert _make(checkout, "dev") == ["-m pip install -e .[dev]"]
    assert (venv / ".installed-dev").exists()
    assert _make(checkout, "dev", "venv") == [], "a dev install includes the runtime one"


def test_a_changed_dependency_list_redoes_each_install(checkout: Path) -> None:
    _make(checkout, "dev")
    for stamp in (checkout / ".venv").glob(".installed-*"):  # installed a minute before pyproject.toml changed
        past = (checkout / "pyproject.toml").stat().st_mtime - 60
        os.utime(stamp, (past, past))
    assert _make(checkout, "venv") == ["-m pip install -e ."]
    assert _make(checkout, "dev") == ["-m pip install -e .[dev]"]
    assert _make(checkout, "dev", "venv") == []


def test_installer_refuses_an_unknown_mode(checkout: Path) -> None:
    out = subprocess.run(["bash", "scripts/install.sh", "everything"], cwd=checkout, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "usage" in out.stderr
