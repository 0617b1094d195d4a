"""The recognisers' PReLU: F.prelu's values, and exactly F.prelu's input gradient from the one-pass kernel, in every
layout the converted models produce; a slope that needs its own gradient gets torch's PReLU. And the process
setting that keeps freed memory for the next iteration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from faceveil.models.prelu import PReLU
from faceveil.runtime.memory import keep_freed_memory


def _inputs(shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize(("shape", "channels_last", "slopes"), [
    ((4, 16, 9, 7), True, 16), ((4, 16, 9, 7), False, 16), ((4, 16, 9, 7), True, 1), ((5, 32), False, 32),
    ((3, 8, 1, 1), True, 8),
])
def test_prelu_matches_torch_exactly(shape: tuple[int, ...], channels_last: bool, slopes: int):
    slope = torch.rand(slopes, generator=torch.Generator().manual_seed(1)) * 0.5 - 0.1  # negative slopes too
    layer = PReLU(slope).requires_grad_(False)
    assert isinstance(layer, nn.PReLU)  # what OPOM's activation hooks look for
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (layer, lambda x: F.prelu(x, slope)):
        x = _inputs(shape, channels_last).requires_grad_(True)
        y = fn(x)
        y.backward(grad_out)
        results.append((y.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_prelu_with_a_trainable_slope_is_torchs():
    layer = PReLU(torch.full((4,), 0.25))
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_keep_freed_memory_on_glibc():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True


def test_kernels_follow_torchs_thread_count_when_it_changes():
    import numba

    from faceveil.runtime.jit import use_torch_threads

    before = torch.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            torch.set_num_threads(threads)
            use_torch_threads()
            assert numba.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
        use_torch_threads()
