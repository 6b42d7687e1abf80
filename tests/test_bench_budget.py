"""bench.budget's measurement: each contender a high-priority child whose own CPU time is recorded and shown."""

from __future__ import annotations

import os
import sys

from bench import budget_report
from bench.child import FULL_CORE, run_child

BUSY = "import os, sys; sum(i * i for i in range(300_000)); print(os.getpriority(os.PRIO_PROCESS, 0)); sys.exit(3)"


def test_child_runs_at_the_highest_priority_allowed_and_reports_its_own_cpu_time(tmp_path) -> None:
    result = run_child([sys.executable, "-c", BUSY], dict(os.environ), tmp_path)
    assert result.returncode == 3  # the child's exit status, not swallowed
    seen = int(result.stdout.split()[-1])
    assert result.niceness == seen  # what the row records is what the child ran at
    assert seen == (-20 if os.geteuid() == 0 else os.nice(0))  # root raises it; others keep their own
    assert result.cpu_s > 0 and result.wall_s > 0
    record = result.record(threads=1)
    assert record["niceness"] == seen and record["cpu_per_wall"] == round(result.cpu_s / result.wall_s, 3)


def test_a_row_that_got_less_than_a_core_is_flagged_in_the_table() -> None:
    assert budget_report._core_share({"cpu_per_wall": 0.97}) == "0.97"
    assert budget_report._core_share({"cpu_per_wall": 0.5}) == f"**0.50 (< {FULL_CORE})**"
    assert budget_report._core_share({}) == "–"  # a result file from before the measurement
