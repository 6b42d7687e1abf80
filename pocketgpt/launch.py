"""Start pocketgpt's own Python subprocesses so that they import this same copy of the code, from any folder.

`python -m pocketgpt.training` puts the working directory first on `sys.path`; a user's folder is free to hold
a `pocketgpt.py` of its own. PYTHONSAFEPATH (3.11+) keeps the working directory off the path, and PYTHONPATH
names the folder this `pocketgpt` package was imported from (the checkout, or site-packages).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pocketgpt

IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pocketgpt.__file__)))


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) set up for a `python -m pocketgpt...` child."""
    env = dict(os.environ if base is None else base)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != IMPORT_ROOT]
    env["PYTHONPATH"] = os.pathsep.join([IMPORT_ROOT, *parts])
    env["PYTHONSAFEPATH"] = "1"
    return env
