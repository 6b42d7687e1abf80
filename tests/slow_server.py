"""`python -m tests.slow_server`: what `pocketgpt serve` runs (`run_server`: uvicorn, signals, exit code), with
an engine slowed by `POCKETGPT_TEST_STEP_DELAY` seconds per step so a stream is still open when a test stops
the server. Settings come from the POCKETGPT_* environment as usual."""

from __future__ import annotations

import functools
import os
import sys

from pocketgpt.app.engine.loader import load_engine
from pocketgpt.app.main import create_app
from pocketgpt.app.serve_cli import run_server
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import slowed

if __name__ == "__main__":
    settings = Settings()
    delay = float(os.environ.get("POCKETGPT_TEST_STEP_DELAY", "0.02"))
    app = create_app(settings, engine_factory=functools.partial(load_engine, runner=slowed(delay)))
    sys.exit(run_server(app, settings))
