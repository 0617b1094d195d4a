"""`faceveil bench models`: forward and forward+backward milliseconds per face, per model and batch size."""

from __future__ import annotations

import os
import statistics
import time

import torch
from tqdm import tqdm

from faceveil.models import zoo


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first call pays for allocation and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_model(name: str, batch: int, repeats: int, seed: int = 0) -> dict:
    model = zoo.load(name)
    size = model.spec.input_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=gen)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        xg = x.clone().requires_grad_(True)
        model(xg).square().sum().backward()

    return {
        "model": name,
        "batch": batch,
        "ms_forward": _median_ms(forward, repeats) / batch,
        "ms_forward_backward": _median_ms(forward_backward, repeats) / batch,
    }


def run(model_names: list[str], batches: list[int], repeats: int, progress: bool = True) -> list[dict]:
    torch.set_num_threads(os.cpu_count() or 1)
    jobs = [(m, b) for m in model_names for b in batches]
    return [bench_model(m, b, repeats) for m, b in tqdm(jobs, desc="bench", disable=not progress)]
