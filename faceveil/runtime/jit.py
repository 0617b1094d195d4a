"""Compiled CPU kernels (numba) for the few hot loops that torch's own ops do in many passes or slowly: the
optimiser's paste-back and crop sampling, and PReLU's input gradient.

Each kernel is compiled on first use and cached on disk (numba's cache: beside the module, or in the user's cache
directory when that is read-only), and runs on as many threads as torch. Every parallel loop writes disjoint
outputs in a fixed order, so results do not depend on the thread count or timing (determinism).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numba
import numpy as np
import torch


def parallel_kernel(fn: Callable) -> Callable:
    """A numba-compiled function with `numba.prange` loops (no fastmath: the same float arithmetic as written)."""
    return numba.njit(parallel=True, cache=True, nogil=True)(fn)


def kernel(fn: Callable) -> Callable:
    """A numba-compiled helper that kernels call (inlined into them)."""
    return numba.njit(cache=True, inline="always")(fn)


def use_torch_threads() -> None:
    """Run numba's parallel loops on torch's thread count (the user's --threads, or the cores).

    Called before every kernel (a recogniser's PReLUs call it some 50 times per iteration), so the count last set
    in this thread is remembered: asking numba costs more than the smaller kernels themselves. numba's count is
    per thread, and only this function sets it."""
    torch_threads = torch.get_num_threads()
    if getattr(_numba_threads, "follows", None) == torch_threads:
        return
    wanted = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    _numba_threads.follows = torch_threads


_numba_threads = threading.local()  # .follows: the torch thread count numba was last set to follow in this thread


def as_array(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor (copied only when not contiguous)."""
    return t.detach().contiguous().numpy()
