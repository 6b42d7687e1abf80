"""The real trainer (`python -m pocketgpt.training train ...`) with a fault injected into its checkpoint writes.

    POCKETGPT_FAULT=KIND:DIR:N python tests/fault_trainer.py train --data ... --out RUN_DIR

The N-th write of `model.safetensors` into a checkpoint DIR (`last` or `best`, i.e. its `.DIR.tmp-*` staging
directory) first writes half the bytes, then:

- `stall`: creates `RUN_DIR/fault-reached` and sleeps (the test kill -9s the process mid-write);
- `enospc`: raises OSError(ENOSPC), as a full disk would.

Every other write goes through untouched. Without POCKETGPT_FAULT this is just the trainer.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pocketgpt.model.checkpoint as checkpoint

_real_save_file = checkpoint.save_file
_writes: dict[str, int] = {}


def _faulty_save_file(tensors, filename, *args, **kwargs):
    kind, target, nth = os.environ["POCKETGPT_FAULT"].split(":")
    staging = Path(filename).parent.name  # `.last.tmp-abc123`
    name = staging[1:].split(".tmp-")[0]
    _writes[name] = _writes.get(name, 0) + 1
    if name != target or _writes[name] != int(nth):
        return _real_save_file(tensors, filename, *args, **kwargs)
    _real_save_file(tensors, filename, *args, **kwargs)
    data = Path(filename).read_bytes()
    Path(filename).write_bytes(data[: len(data) // 2])
    if kind == "stall":
        (Path(filename).parent.parent / "fault-reached").write_text(str(filename))
        time.sleep(600)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))


if os.environ.get("POCKETGPT_FAULT"):
    checkpoint.save_file = _faulty_save_file

if __name__ == "__main__":
    from pocketgpt.training.cli import main

    sys.exit(main())
