"""pocketgpt: train your own small GPT, then serve it.

The code lives in the repository's top-level `app/`, `model/` and `training/` folders and is imported as
`pocketgpt.app`, `pocketgpt.model` and `pocketgpt.training`, so that it never collides with a user's own
`model.py` or `app/` (nor, installed, with another distribution's top-level `app` package). An installed wheel
places the three folders inside this package (setuptools `package-dir`, see pyproject.toml); in a source checkout
they sit beside this folder, and the lines below make them subpackages from there.
"""

from __future__ import annotations

import os

_here = os.path.dirname(os.path.abspath(__file__))
_checkout = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "model")) and os.path.isfile(os.path.join(_checkout, "model", "gpt.py")):
    __path__.append(_checkout)
