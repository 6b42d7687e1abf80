"""The served engine behind one indirection, so the model can be swapped while requests are running.

Routes read `holder.current` at admission time. `swap()` loads the new checkpoint in a worker thread beside
the old engine; only when that succeeded does `current` change, so a checkpoint that fails to load leaves the
old model serving. The old engine then admits nothing more, finishes its in-flight requests, stops, and its
memory is released.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from pocketgpt.app.engine.engine import Engine

log = logging.getLogger("pocketgpt.engine")

EngineFactory = Callable[[Path], Engine]


class EngineHolder:
    """Holds the engine that new requests go to, plus the ones still draining after a swap."""

    def __init__(self, factory: EngineFactory) -> None:
        self._factory = factory
        self.current: Engine | None = None
        self._draining: set[Engine] = set()
        self._retiring: set[asyncio.Future[None]] = set()  # background drains (swap without waiting)
        self._lock: asyncio.Lock | None = None  # created in the running loop on first use

    @property
    def engines(self) -> list[Engine]:
        """Every engine still holding requests: the current one and any being drained."""
        current = [self.current] if self.current is not None else []
        return current + list(self._draining)

    async def load(self, checkpoint: str | Path) -> Engine:
        """Load the first engine (same as `swap` with nothing to replace)."""
        return await self.swap(checkpoint)

    async def swap(self, checkpoint: str | Path, *, wait_drained: bool = True,
                   drain_timeout: float | None = None) -> Engine:
        """Serve `checkpoint` from now on and return the new engine.

        Raises whatever loading raises (CheckpointError for a bad directory), with the old engine untouched.
        With `wait_drained` (default) it returns once the old engine has finished its in-flight requests and
        stopped; without, it returns as soon as new requests go to the new engine and the old one drains in
        a background task (an admin route can answer at once). After `drain_timeout` seconds the old engine
        is stopped anyway and its remaining requests get an error event. Swaps are serialized; requests are
        never refused because of one.
        """
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            new = await asyncio.to_thread(self._factory, Path(checkpoint))
            old, self.current = self.current, new
            if old is None:
                log.info("serving %s from %s", new.name, new.path)
                return new
            old.close()  # from here on, submits to it raise EngineClosed and callers retry on `current`
            self._draining.add(old)
            log.info("swapped to %s from %s; draining %d request(s)", new.path, old.path, old.outstanding)
        retire = asyncio.ensure_future(self._retire(old, drain_timeout))
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)
        if wait_drained:
            await asyncio.shield(retire)
        return new

    async def close(self) -> None:
        """Stop every engine (server shutdown); in-flight requests get an error event."""
        for engine in self.engines:
            await self._release(engine)
        for task in list(self._retiring):
            await task
        self.current = None

    async def _retire(self, engine: Engine, timeout: float | None) -> None:
        try:
            await self._drain(engine, timeout)
        finally:
            await self._release(engine)

    @staticmethod
    async def _drain(engine: Engine, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while engine.outstanding > 0 and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.01)

    async def _release(self, engine: Engine) -> None:
        # Forget it before stopping it: once its thread is gone it is no longer among `engines`.
        self._draining.discard(engine)
        if engine.model is not None:  # close() and a background drain may both get here; stop() is idempotent
            await asyncio.to_thread(engine.stop)
        if engine is self.current:
            self.current = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
