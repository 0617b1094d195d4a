"""glibc malloc keeps freed memory: the user's own settings win, and repeated large allocations stop faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from faceveil.malloc import _glibc, keep_freed_memory


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "0"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_the_users_own_malloc_settings_are_kept(env: dict) -> None:
    assert keep_freed_memory(env) is False


def test_repeated_large_allocations_stop_faulting_after_import() -> None:
    """Ten 48 MB arrays allocated, written and freed one after another: by default glibc maps each one afresh
    (5,361 page faults for the ten on this project's machine); after `import faceveil` the first one's memory is
    reused (0)."""
    if _glibc() is None:
        pytest.skip("not glibc: malloc is left as it is")
    code = ("import resource, numpy as np, faceveil\n"
            "np.ones(12 << 20, np.float32)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(10): np.ones(12 << 20, np.float32)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    faults = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert faults < 100
