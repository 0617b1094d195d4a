"""How long the surrogate networks themselves run inside a job: wall time between each recogniser's forward
entry and exit, and between the start and the end of its backward, summed.

`bench protect` compares a job with a floor timed separately right after it; on a CPU whose speed drifts by
10-50 % within minutes, that ratio moves by about as much between identical runs. Timed inside the same run, the
networks' share is free of the drift: `seconds / network seconds` is the overhead of everything around them (paste,
rounding, crop sampling, the step, detection, I/O) at the speed the machine had during that very run.

The autograd engine runs a graph's nodes one at a time, latest-created first, so one recogniser's backward runs
from its output's gradient to its input's without the other's in between (each forward is called once per pass).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from torch import nn


class NetworkClock:
    """Accumulated seconds inside the given modules' forward and backward passes."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: dict[tuple[int, str], float] = {}

    def _start(self, key: tuple[int, str]) -> None:
        self._started[key] = time.perf_counter()

    def _stop(self, key: tuple[int, str]) -> None:
        started = self._started.pop(key, None)
        if started is not None:
            self.seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def timing(self, modules: list[nn.Module]) -> Iterator[NetworkClock]:
        """Hooks on every module while the block runs (removed after, also on error)."""
        handles = []
        for module in modules:
            key = id(module)
            handles += [
                module.register_forward_pre_hook(lambda *_, k=(key, "forward"): self._start(k)),
                module.register_forward_hook(lambda *_, k=(key, "forward"): self._stop(k)),
                module.register_full_backward_pre_hook(lambda *_, k=(key, "backward"): self._start(k)),
                module.register_full_backward_hook(lambda *_, k=(key, "backward"): self._stop(k)),
            ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
