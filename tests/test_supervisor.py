"""The supervisor's pure parts: how many workers ``--workers auto`` means."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fibrpc.supervisor import cpu_count, cpus_of_quota


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("200000 100000\n", 2),
        ("150000 100000", 2),  # 1.5 CPUs: rounded up
        ("50000 100000", 1),
        ("max 100000", None),
        ("", None),
        ("garbage", None),
        ("-1 100000", None),
    ],
)
def test_a_cgroup_quota_is_read_as_whole_cpus(text, cpus):
    assert cpus_of_quota(text) == cpus


def test_workers_auto_counts_no_more_cpus_than_the_quota_allows(tmp_path: Path):
    may_run_on = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")
    assert cpu_count(quota) == 1
    quota.write_text("max 100000\n")
    assert cpu_count(quota) == may_run_on
    assert cpu_count(tmp_path / "missing") == may_run_on
    quota.write_text(f"{(may_run_on + 8) * 100000} 100000\n")
    assert cpu_count(quota) == may_run_on  # a quota above the CPUs it may run on
