"""The model's CPU thread count: a core is left to the event loop unless POCKETGPT_THREADS says otherwise."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pocketgpt.app.engine import loader
from pocketgpt.app.settings import Settings


@pytest.mark.parametrize(("cores", "want"), [(1, 1), (2, 1), (16, 15)])
def test_cpu_default_leaves_a_core_for_the_event_loop(monkeypatch: pytest.MonkeyPatch, cores: int, want: int) -> None:
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert loader.resolve_threads(None, torch.device("cpu")) == want


def test_given_threads_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert loader.resolve_threads(3, torch.device("cpu")) == 3
    monkeypatch.setenv("POCKETGPT_THREADS", "2")
    assert Settings().threads == 2


def test_zero_threads_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POCKETGPT_THREADS", "0")
    with pytest.raises(ValidationError, match="threads"):
        Settings()


def test_loading_an_engine_sets_the_thread_count(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from tests.conftest import make_tiny_checkpoint

    before = torch.get_num_threads()
    want = 2 if before != 2 else 3
    path = make_tiny_checkpoint(tmp_path / "ck")
    engine = loader.load_engine(path, Settings(threads=want, max_running=1))
    try:
        assert torch.get_num_threads() == want
    finally:
        engine.stop()
        torch.set_num_threads(before)
