"""Logging for the `pocketgpt.*` loggers (access log included), set up once, without touching root."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    """Give the `pocketgpt` loggers a level and, if nothing else will print them, a stderr handler."""
    logger = logging.getLogger("pocketgpt")
    logger.setLevel(level.upper())
    # Under pytest or an application that configured logging, records propagate to root: add nothing.
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
