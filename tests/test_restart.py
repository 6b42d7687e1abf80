"""A hot-swapped checkpoint survives a restart (issue 13, item 13).

Each "restart" is a new `create_app` over the same database, data and checkpoint roots, run through its
lifespan in-process. The swapped checkpoint is served again unless the configured checkpoint changed, or the
swapped one is gone or no longer loads (then the configured one, with a warning).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from pocketgpt.app.jobs import served
from pocketgpt.app.jobs.store import JobStore
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from tests.admin_helpers import ADMIN, USER, make_settings
from tests.conftest import make_tiny_checkpoint


def served_after_start(settings: Settings, swap_to: str | None = None) -> dict[str, Any]:
    """Start an app, optionally hot-swap it to `swap_to`, and return what /info and /admin/model say."""
    app = create_app(settings)

    async def run() -> dict[str, Any]:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as client:
            if swap_to is not None:
                r = await client.post("/admin/model", headers=ADMIN, json={"checkpoint": swap_to})
                assert r.status_code == 200, r.text
            info = (await client.get("/info", headers=USER)).json()
            admin = (await client.get("/admin/model", headers=ADMIN)).json()
            return {"info": info["checkpoint"], "admin": admin["checkpoint"], "model": info["model"]}

    return asyncio.run(run())


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    for name in ("starter", "other", "third"):
        make_tiny_checkpoint(tmp_path / "ckpt" / name, seed=len(name))
    return tmp_path


def test_a_swapped_checkpoint_is_served_again_after_a_restart(roots: Path) -> None:
    settings = make_settings(roots, roots / "ckpt" / "starter")
    first = served_after_start(settings, swap_to="other")
    assert first["admin"] == "other"
    again = served_after_start(make_settings(roots, roots / "ckpt" / "starter"))
    assert again["admin"] == "other" and again["info"] == str((roots / "ckpt" / "other").resolve())
    assert again["model"] == "other"


def test_a_changed_configuration_wins_over_the_remembered_swap(roots: Path) -> None:
    served_after_start(make_settings(roots, roots / "ckpt" / "starter"), swap_to="other")
    assert served_after_start(make_settings(roots, roots / "ckpt" / "third"))["admin"] == "third"


def test_a_server_started_empty_remembers_its_first_load(roots: Path) -> None:
    served_after_start(make_settings(roots, None), swap_to="other")
    assert served_after_start(make_settings(roots, None))["admin"] == "other"


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_a_swapped_checkpoint_that_is_gone_or_broken_falls_back_with_a_warning(
        roots: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    served_after_start(make_settings(roots, roots / "ckpt" / "starter"), swap_to="other")
    other = roots / "ckpt" / "other"
    if damage == "deleted":
        shutil.rmtree(other)
    else:
        (other / "model.safetensors").write_bytes(b"not safetensors")
    with caplog.at_level(logging.WARNING, logger="pocketgpt"):
        after = served_after_start(make_settings(roots, roots / "ckpt" / "starter"))
    assert after["admin"] == "starter"
    assert any("not serving the hot-swapped checkpoint" in r.getMessage() for r in caplog.records), caplog.text


def test_remember_and_recall_in_the_store(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    make_tiny_checkpoint(root / "job-1" / "best")
    store = JobStore(tmp_path / "jobs.db")
    assert served.recall(store, root, None) is None
    served.remember(store, root, None, root / "job-1" / "best")
    assert store.get_setting(served.KEY)["checkpoint"] == "job-1/best"
    assert served.recall(store, root, None) == (root / "job-1" / "best").resolve()
    assert served.recall(store, root, root / "elsewhere") is None  # configured differently since
    served.remember(store, root, None, tmp_path / "outside")  # not under the root: not remembered
    assert store.get_setting(served.KEY)["checkpoint"] == "job-1/best"
    store.close()
