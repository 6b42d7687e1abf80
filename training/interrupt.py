"""Stopping at once on SIGTERM / SIGINT while a run is being prepared (there is nothing to save yet).

A Python signal handler runs in the main thread, between bytecodes: it cannot run while the main thread is
inside a long native call. BPE training in HF `tokenizers` is such a call (seconds to minutes on a large
corpus), and so is encoding a batch. `off_main_thread` runs those calls in a worker thread (they release the
GIL) while the main thread waits, so the handler runs at once and its `Interrupted` propagates. The abandoned
worker keeps computing; with torch loaded, interpreter shutdown waits for it (measured: the rest of the BPE
training), so `exit_now_if_abandoned` ends the process without that shutdown once everything is flushed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_running: set[Future[Any]] = set()  # calls started by `in_background` and not finished yet


class Interrupted(Exception):
    """A stop signal arrived before there was anything to save; the exit code is 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} while preparing the run: nothing was trained "
                         "or saved (a data preparation cut short is redone from the start next time)")
        self.signum = signum


def in_background(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Start `fn(*args)` in a daemon thread; its Future can be waited on with a timeout, or interruptibly."""
    future: Future[T] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to whoever waits on the future
            future.set_exception(e)

    _running.add(future)
    future.add_done_callback(_running.discard)
    # Not a ThreadPoolExecutor: interpreter exit joins its threads, which is the wait we must not have.
    threading.Thread(target=target, name="pocketgpt-prepare", daemon=True).start()
    return future


def off_main_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, run in a worker thread while the main thread waits, so signal handlers are not held up."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    # Future.result waits on a lock, which a signal interrupts: a handler that raises ends the wait with its
    # exception. (Not Thread.join: an interrupted join marks the thread stopped while it still runs, CPython 3.11.)
    return in_background(fn, *args).result()


def exit_now_if_abandoned(code: int) -> None:
    """Exit with `code` now, skipping interpreter shutdown, if a worker of `in_background` still runs (the
    command has already closed its files; this only flushes stdio)."""
    if _running:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
