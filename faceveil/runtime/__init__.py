"""Process-wide settings for the compute-heavy work: how OpenMP's idle threads wait (openmp.py), glibc keeping freed
memory (memory.py), and the compiled kernels (jit.py). Applied by `prepare_process` when work starts (the CLI's
entry, the Python API's first call), never on import."""

from __future__ import annotations

from faceveil.runtime.memory import keep_freed_memory
from faceveil.runtime.openmp import choose_wait_policy


def prepare_process() -> None:
    """Choose the OpenMP wait policy (only effective before torch is imported) and keep freed memory for reuse."""
    import sys

    if "torch" not in sys.modules:
        choose_wait_policy()
    keep_freed_memory()
