"""`python -O` strips `assert`: the shipped code must not rely on one for control flow."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from pocketgpt.app.engine.engine import Engine
from pocketgpt.app.engine.holder import EngineHolder
from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import Generation, GenerationSpec
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.model.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "model", "training", "pocketgpt")


def test_shipped_packages_have_no_assert_statements() -> None:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
                      if isinstance(node, ast.Assert)]
    assert not found, f"assert statements vanish under `python -O`; raise an explicit error instead: {found}"


def test_a_cancelled_generation_raises_an_api_error_instead_of_returning_nothing(tiny_checkpoint: Path) -> None:
    """`collect()` used to `assert self.result is not None`: under -O it returned None to the route."""

    async def scenario() -> None:
        holder = EngineHolder(lambda path: Engine(load_checkpoint(path), max_running=2, max_queue=2).start())
        await holder.load(tiny_checkpoint)
        try:
            spec = GenerationSpec(prompt="The quick", max_new_tokens=8, params=SamplingParams(temperature=0.0),
                                  seed=0)
            generation = Generation.start(holder, spec)
            generation.cancel()  # e.g. a shutdown cancelled it before its `done`
            with pytest.raises(APIError) as info:
                await generation.collect()
            assert info.value.status == 500
            assert "without a result" in info.value.message
        finally:
            await holder.close()

    asyncio.run(scenario())
