"""The training command line as a process: bad input, signals, a crash mid-save, and torchrun/DDP on CPU."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pocketgpt.model.checkpoint import load_checkpoint, load_train_state
from pocketgpt.training.cli import main
from pocketgpt.training.metrics import read_metrics
from tests.test_training_data import write_corpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "8", "--tokenizer-vocab", "300", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def wait_for(predicate, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def has_train_record(run: Path, min_step: int = 1) -> bool:
    path = run / "metrics.jsonl"
    return path.exists() and any(r["type"] == "train" and r["step"] >= min_step for r in read_metrics(path))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("cli") / "corpus.txt", 3000)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "data source not found: .*nowhere.txt"),
        ("empty", "the corpus is empty: 1 file"),
        ("binary", r"blob.bin is not UTF-8 text \(binary\)"),
        ("vocab", "tokenizer_vocab: Input should be greater than or equal to 260"),
        ("context", r"split has \d+ tokens, too few for one window of block_size\+1 = 4097"),
        ("model-vocab", "vocab_size 100 is smaller than the tokenizer's 300 tokens"),
    ],
)
def test_bad_input_is_a_clear_message_with_exit_code_2(corpus: Path, tmp_path: Path, capsys, case, message) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    data = {"missing": tmp_path / "nowhere.txt", "empty": tmp_path / "empty.txt", "binary": tmp_path / "blob.bin"}
    extra = {"vocab": ["--tokenizer-vocab", "100"], "context": ["--block-size", "4096"],
             "model-vocab": ["--vocab-size", "100"]}.get(case, [])
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data.get(case, corpus)), *TINY, *extra, "--max-steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    if case in ("missing", "context"):  # the run had started: the admin API sees why it failed
        assert read_metrics(out / "metrics.jsonl")[-1]["type"] == "error"


def test_bad_input_exit_code_from_a_real_process(tmp_path: Path) -> None:
    # Through the console dispatcher (`pocketgpt train ...` execs `python -m pocketgpt.training train ...`).
    dispatch = "import sys; from app.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", dispatch, "train", "--data", str(tmp_path / "nope.txt"), "--out",
                           str(tmp_path / "run")], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data source not found" in proc.stderr and "Traceback" not in proc.stderr
    usage = subprocess.run([sys.executable, "-m", "pocketgpt.training", "train", "--max-steps", "lots"], cwd=ROOT,
                           env=env(),
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "invalid int value" in usage.stderr


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_last_and_exits_with_128_plus_signal(corpus: Path, tmp_path: Path, sig, code) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pocketgpt.training", "train", "--data", str(corpus), *TINY, "--max-steps", "100000",
         "--eval-every", "100000", "--log-every", "5", "--out", str(run)],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: has_train_record(run, 10), proc=proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:
        proc.kill()
    end = read_metrics(run / "metrics.jsonl")[-1]
    assert (end["type"], end["status"], end["reason"]) == ("end", "cancelled", "signal")
    ckpt = load_checkpoint(run / "last")
    assert ckpt.meta["step"] == end["step"] >= 10
    assert load_train_state(run / "last")["step"] == end["step"]
    assert "Traceback" not in proc.stderr.read()


def random_words_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Lines of random words: a corpus whose BPE training and tokenizing take seconds, not milliseconds."""
    r = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(r.choices(letters, k=r.randint(2, 9))) for _ in range(20_000)]
    lines = [" ".join(r.choices(words, k=200)) for _ in range(int(megabytes * 1e6 / 1200))]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("phase", ["tokenizer training", "tokenizing", "prepare command"])
def test_sigterm_while_preparing_data_stops_at_once_and_keeps_nothing(tmp_path: Path, phase: str) -> None:
    """Issue 13: SIGTERM while the data is prepared used to wait for the whole preparation (minutes on a big
    corpus) and then save an untrained `last/`. Now: exit 143 within seconds, a clear message, and no prepared
    data that a later run would take as complete."""
    corpus = random_words_corpus(tmp_path / "corpus.txt", 3)
    run = tmp_path / "run"
    args = ["train", "--data", str(corpus), *TINY[:4], "--device", "cpu", "--max-steps", "5", "--out", str(run)]
    if phase == "prepare command":  # `pocketgpt prepare`: the same preparation, no trainer around it
        args = ["prepare", "--data", str(corpus), "--tokenizer-vocab", "2000", "--out", str(run)]
        marker = "training a 2000-token BPE tokenizer"
    elif phase == "tokenizing":  # a given tokenizer (the checkpoint's): straight to tokenizing, no BPE training
        from tests.conftest import make_tiny_checkpoint

        args += ["--init-from", str(make_tiny_checkpoint(tmp_path / "base", block_size=32))]
        marker = "tokenizing 1 file(s)"
    else:
        args += ["--tokenizer-vocab", "2000"]
        marker = "training a 2000-token BPE tokenizer"
    proc = subprocess.Popen([sys.executable, "-m", "pocketgpt.training", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while marker not in (line := proc.stderr.readline()):
            assert line, f"exited with {proc.wait()} before {marker!r}: {''.join(seen)}"
            seen.append(line)
        time.sleep(0.5)  # well into it
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert code == 143, err
    assert elapsed < 5, f"took {elapsed:.1f}s to stop"
    assert "stopped by SIGTERM while preparing the run: nothing was trained or saved" in err
    assert "Traceback" not in err
    prepared = run / "data"
    # meta.json marks prepared data complete: never written, and no half-written token file left behind.
    assert not (prepared / "meta.json").exists() and not (prepared / "tokens.tmp").exists()
    assert not (run / "last").exists()


# Runs training with checkpoint writes that hang (after the weights file) from the third save on.
SLOW_SAVE_DRIVER = """
import sys, time
import pocketgpt.model.checkpoint as ck
real, calls = ck.save_file, [0]
def save_file(*args, **kwargs):
    real(*args, **kwargs)
    calls[0] += 1
    if calls[0] >= 3:
        print("IN_SAVE", flush=True)
        time.sleep(120)
ck.save_file = save_file
from pocketgpt.training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", str(corpus), *TINY, "--max-steps", "30", "--eval-every", "20", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE_DRIVER, *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "IN_SAVE"  # saves 1 and 2 were best@20 and last@20
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert list(run.glob(".*.tmp-*")), "the kill should have interrupted a write"
    assert load_checkpoint(run / "last").meta["step"] == 20
    assert load_train_state(run / "last")["step"] == 20
    # ... and the run carries on from it.
    done = subprocess.run([sys.executable, "-m", "pocketgpt.training", "train", "--resume", str(run)], cwd=ROOT,
                          env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(run / "last").meta["step"] == 30


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_group(argv: list[str], timeout: float, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """Run a command that starts several processes; on timeout kill them all and fail with their output
    (torchrun relays its workers' output), instead of leaving a worker behind waiting."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv[2:5]} still running after {timeout}s; the workers' output:\n"
                    f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_ddp_two_processes_match_one(corpus: Path, tmp_path: Path) -> None:
    """2 gloo processes, each taking half of every global batch, follow the 1-process run.

    Identical data and init make the runs equal up to float summation order (the gradient all-reduce),
    so losses and weights agree to ~1e-6; the bar is 1e-4.
    """
    args = ["train", "--data", str(corpus), *TINY, "--max-steps", "12", "--log-every", "1", "--eval-every", "6",
            "--warmup-steps", "2", "--data-dir", str(tmp_path / "prepared"), "--dist-timeout", "60"]
    single = subprocess.run([sys.executable, "-m", "pocketgpt.training", *args, "--out", str(tmp_path / "one")],
                            cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = run_group([*TORCHRUN, "-m", "pocketgpt.training", *args, "--out", str(tmp_path / "two")], timeout=240)
    assert ddp.returncode == 0, ddp.stderr

    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    # Only rank 0 wrote: one start, each step logged once, the same checkpoints as the single process.
    assert [r["type"] for r in two] == [r["type"] for r in one]
    assert [r["type"] for r in two].count("start") == 1
    losses = [(a["loss"], b["loss"]) for a, b in zip(one, two, strict=True) if a["type"] == "train"]
    assert len(losses) == 12 and max(abs(a - b) for a, b in losses) < 1e-4
    a, b = load_checkpoint(tmp_path / "one" / "last"), load_checkpoint(tmp_path / "two" / "last")
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-4), name
    assert load_train_state(tmp_path / "two" / "last")["world_size"] == 2


def rank_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun would set for one of 2 processes, rendezvous at 127.0.0.1:port hosted by rank 0."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@pytest.mark.slow  # waits out a rendezvous timeout (~11 s); the hanging-peer test covers the same deadline
def test_a_process_whose_peer_never_starts_fails_after_the_timeout(corpus: Path, tmp_path: Path) -> None:
    """Rank 0 of 2 started alone: it gives up joining after --dist-timeout, saying why, instead of waiting."""
    from tests.serverproc import free_port

    t0 = time.monotonic()
    alone = run_group([sys.executable, "-m", "pocketgpt.training", "train", "--data", str(corpus), *TINY,
                       "--max-steps", "2", "--dist-timeout", "3", "--out", str(tmp_path / "run")], timeout=120,
                      **rank_env(0, free_port()))
    elapsed = time.monotonic() - t0
    assert alone.returncode == 1, alone.stderr
    assert "rank 0 of 2 could not join the process group at 127.0.0.1:" in alone.stderr
    assert "within 3s" in alone.stderr and "Traceback" not in alone.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s"


# Rank 1 hangs (alive, in no collective) at step 3, as a stuck worker would.
HANG_DRIVER = """
import os, sys, time
from pocketgpt.training.trainer import Trainer
real = Trainer._train_step
def train_step(self, step):
    if step == 3 and os.environ["RANK"] == "1":
        print("HANGING", flush=True)
        time.sleep(600)
    return real(self, step)
Trainer._train_step = train_step
from pocketgpt.training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_process_whose_peer_hangs_fails_after_the_timeout(corpus: Path, tmp_path: Path) -> None:
    """The other process stops taking part (alive, stuck): the survivor's collective times out after
    --dist-timeout and it exits non-zero with the reason, rather than waiting forever."""
    from tests.serverproc import free_port

    port = free_port()
    args = ["train", "--data", str(corpus), *TINY, "--max-steps", "50", "--eval-every", "1000",
            "--data-dir", str(tmp_path / "prepared"), "--dist-timeout", "3", "--out", str(tmp_path / "run")]
    procs = [subprocess.Popen([sys.executable, "-c", HANG_DRIVER, *args], cwd=ROOT, env=env(**rank_env(rank, port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    survivor, stuck = procs
    try:
        assert stuck.stdout.readline().strip() == "HANGING"
        t0 = time.monotonic()
        code = survivor.wait(timeout=90)
        elapsed = time.monotonic() - t0
        err = survivor.stderr.read()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert code == 1, err
    assert "timed out" in err.lower(), err[-3000:]
    assert elapsed < 45, f"took {elapsed:.0f}s after the peer hung"


def test_prepare_command_then_train_reuses_the_data(corpus: Path, tmp_path: Path, capsys) -> None:
    args = ["--data", str(corpus), "--tokenizer-vocab", "300", "--out", str(tmp_path / "run")]
    assert main(["prepare", *args]) == 0
    out = capsys.readouterr().out
    assert "train +" in out and (tmp_path / "run" / "data" / "train.bin").is_file()
    assert main(["train", *args, *TINY[:6], "--max-steps", "1", "--eval-batches", "1"]) == 0
    assert "reusing prepared data" in capsys.readouterr().err


def test_progress_bar_on_a_terminal_and_lines_otherwise() -> None:
    import io

    from pocketgpt.training.progress import Progress

    bar_out, lines_out = io.StringIO(), io.StringIO()
    for progress in (Progress(stream=bar_out, interactive=True), Progress(stream=lines_out, interactive=False)):
        progress.begin(total=100, initial=0)
        progress.step()
        progress.report(1, 100, 2.5, 1e-3, 1234.0, 75.0)
        progress.close()
    assert "loss=2.5000" in bar_out.getvalue() and "1/100" in bar_out.getvalue()
    assert lines_out.getvalue() == "step 1/100 | loss 2.5000 | lr 1.00e-03 | 1,234 tok/s | eta 1m15s\n"
