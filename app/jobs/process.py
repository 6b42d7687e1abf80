"""One trainer OS process: start it, signal it, see whether it is alive, and read what it left behind.

A trainer runs in its own session (process group), so a Ctrl-C on the server's terminal does not reach it
directly: the manager decides what a server shutdown means for a job (SIGTERM, then `interrupted`). Its stdout
and stderr go to a log file rather than a pipe, so it neither blocks on a full pipe nor dies of SIGPIPE if the
server goes away; after a server crash the next server can *adopt* it by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from pathlib import Path

from pocketgpt.app.jobs.metrics import Attempt
from pocketgpt.app.jobs.store import CANCELLED, FAILED, INTERRUPTED, SUCCEEDED
from pocketgpt.launch import child_env

LOG_FILE = "train.log"
SECRET_ENV = ("POCKETGPT_ADMIN_TOKEN", "POCKETGPT_API_KEYS")  # never passed on to a trainer


class TrainerProcess:
    """A running (or finished) trainer: either our own child (`Popen`) or a process adopted by pid."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None, marker: str | None = None) -> None:
        self.pid = pid
        self._popen = popen
        self._marker = marker  # a string in the adopted process's command line (its run dir)

    @classmethod
    def spawn(cls, argv: list[str], cwd: str | Path, log_path: Path, env: dict[str, str] | None = None
              ) -> TrainerProcess:
        """Start `argv` in `cwd` with stdout+stderr appended to `log_path`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # The server's secrets stay in the server: a trainer (which runs user-chosen data and settings, and whose
        # log is readable over the admin API) has no use for the admin token or the inference keys.
        inherited = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        full_env = child_env({**inherited, "PYTHONUNBUFFERED": "1", **(env or {})})
        with open(log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== {stamp} pocketgpt: starting {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=full_env, start_new_session=True,
            )
        return cls(popen.pid, popen=popen)

    @classmethod
    def adopt(cls, pid: int, marker: str) -> TrainerProcess | None:
        """The process `pid` if it is alive and its command line contains `marker`, else None."""
        proc = cls(pid, marker=marker)
        return proc if proc._adopted_alive() else None

    def _adopted_alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # someone else's process: the pid was reused
        cmdline = Path(f"/proc/{self.pid}/cmdline")
        if cmdline.exists():  # Linux: make sure the pid was not reused by an unrelated process
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = Path(f"/proc/{self.pid}/stat").read_text()
            except OSError:
                return False
            if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie has finished its work
                return False
            return bool(self._marker) and self._marker in text
        return True

    @property
    def owned(self) -> bool:
        """True if this server started the process (and so will learn its exit code)."""
        return self._popen is not None

    def poll(self) -> tuple[bool, int | None]:
        """(finished, exit code); the exit code is None for an adopted process (not our child)."""
        if self._popen is not None:
            rc = self._popen.poll()
            return rc is not None, rc
        return not self._adopted_alive(), None

    def terminate(self) -> None:
        """Ask the trainer to save and stop (SIGTERM to the trainer itself; it stops its own helpers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the trainer's whole process group (it had its chance to stop cleanly)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)


def tail_lines(path: Path, n: int, max_bytes: int = 256 * 1024) -> str:
    """The last `n` lines of a text file (reading at most its last `max_bytes`); "" if it is missing."""
    if n <= 0:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    lines = deque(data.decode("utf-8", errors="replace").splitlines(), maxlen=n)
    return "\n".join(lines) + ("\n" if lines else "")


_SIGNAL_EXITS = {128 + signal.SIGTERM, -signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGINT}
_KILLED = {-signal.SIGKILL, 128 + signal.SIGKILL}


def final_status(rc: int | None, intent: str | None, attempt: Attempt) -> tuple[str, str | None]:
    """How a finished run ends: (status, error message or None).

    `rc` is the exit code (None when unknown, for an adopted process); `intent` is why we signalled it, if we
    did: "cancel" (user) or "shutdown" (server stopping); `attempt` holds the run's end/error records.
    """
    end_status = (attempt.end or {}).get("status")
    if rc == 0 or (rc is None and end_status == "succeeded"):
        return SUCCEEDED, None
    if intent == "shutdown":
        return INTERRUPTED, None
    if intent == "cancel":
        return CANCELLED, None
    if rc in _SIGNAL_EXITS or (rc is None and end_status == "cancelled"):
        return CANCELLED, None  # stopped by a signal from someone else; it saved `last`, so it can resume
    if rc is None and attempt.error is None:
        return INTERRUPTED, None  # vanished without a word, e.g. killed while no server was watching
    if attempt.error:
        return FAILED, attempt.error
    if rc in _KILLED:
        return FAILED, "the trainer was killed by SIGKILL (out of memory?)"
    if rc is not None and rc < 0:
        return FAILED, f"the trainer was killed by signal {-rc}"
    return FAILED, f"the trainer exited with code {rc}"
