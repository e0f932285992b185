"""`footprints.runtime.heap`: large blocks go back to the system when freed, so peak memory does not creep up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import sys, numpy as np, psutil
if sys.argv[1] == "fix":
    from footprints.runtime.heap import bound_heap_growth
    assert bound_heap_growth()
p = psutil.Process()
a = np.ones(20_000_000 // 8); del a  # a 20 MB block freed: glibc raises its mmap threshold to 20 MB
b = np.ones(10_000_000 // 8); keep = np.ones(1000)  # so 10 MB come from the heap, something after them
before = p.memory_info().rss
del b
print((before - p.memory_info().rss) / 1e6)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_block_returns_to_the_system_only_with_the_fixed_threshold():
    # any MALLOC_* tuning variable (distributed sets MALLOC_TRIM_THRESHOLD_) switches glibc's dynamic
    # threshold off too: the probe runs without them
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def returned_mb(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert returned_mb("none") < 1.0  # glibc's dynamic threshold keeps the 10 MB in its heap
    assert returned_mb("fix") > 9.0  # its own mapping, unmapped when freed


def test_children_inherit_the_threshold_and_a_users_setting_wins(monkeypatch):
    from footprints.runtime.heap import MMAP_THRESHOLD, bound_heap_growth

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    bound_heap_growth()
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(MMAP_THRESHOLD)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    bound_heap_growth()
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "65536"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "not a number")
    assert bound_heap_growth() is False
