"""How long the surrogate networks themselves run inside a job: wall time between each recogniser's forward
entry and exit, and between the start and the end of its backward, summed.

`bench protect` compares a job with a floor timed separately right after it; on a CPU whose speed drifts by
10-50 % within minutes, that ratio moves by about as much between identical runs. Timed inside the same run, the
networks' share is free of the drift: `seconds / network seconds` is the overhead of everything around them (paste,
rounding, crop sampling, the step, detection, I/O) at the speed the machine had during that very run.

The clock should not slow what it times. Module backward hooks (`register_full_backward_hook`) wrap every input
and output in an extra autograd function: a 4-face optimisation took 3.73 s with them against 3.61 s without any
clock (medians of four, alternating in one process); the in-run ratio came out the same (1.168), the extra time
falling inside the networks' share too. So the backward is timed by two light hooks instead (3.63 s, same ratio):
one before the node that made the network's output runs (its backward starts), one on the network's own view of
its input, whose gradient is complete when its backward ends. The autograd engine runs a graph's nodes one at a
time, latest-created first, so one recogniser's backward runs from its output's node to its input's without the
other's in between (each forward is called once per pass).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
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

    def _before_forward(self, key: int, inputs: tuple) -> tuple | None:
        """Starts the forward clock; gives the network its own alias of its input (a view: same values and
        strides) when a gradient will flow, so that the alias's gradient is this network's alone (two
        recognisers of one geometry read the same crops tensor)."""
        self._start((key, "forward"))
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
            return (x.view_as(x), *inputs[1:])
        return None

    def _after_forward(self, key: int, inputs: tuple, output: object) -> None:
        """Stops the forward clock; the backward's clock starts when the engine runs the node that made the
        output and stops when the input's gradient is complete."""
        self._stop((key, "forward"))
        x = inputs[0] if inputs else None
        if isinstance(output, torch.Tensor) and output.grad_fn is not None and isinstance(x, torch.Tensor) \
                and x.requires_grad:
            output.grad_fn.register_prehook(lambda _grads: self._start((key, "backward")))
            x.register_hook(lambda _grad: self._stop((key, "backward")))

    @contextlib.contextmanager
    def timing(self, modules: list[nn.Module]) -> Iterator[NetworkClock]:
        """Hooks on every module while the block runs (removed after, also on error)."""
        handles = []
        for module in modules:
            key = id(module)
            handles += [
                module.register_forward_pre_hook(lambda _m, i, k=key: self._before_forward(k, i)),
                module.register_forward_hook(lambda _m, i, o, k=key: self._after_forward(k, i, o)),
            ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
