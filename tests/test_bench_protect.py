"""`faceveil bench protect` pieces: the forward+backward floor scales with iterations and batch."""

from __future__ import annotations

import pytest
from conftest import needs_weights


@needs_weights
@pytest.mark.slow
def test_floor_is_positive_and_grows_with_iterations():
    from faceveil.bench.protect import floor_seconds

    one = floor_seconds(["mobileface"], 2, 1, repeats=1)
    assert one > 0
    assert floor_seconds(["mobileface"], 2, 10, repeats=1) > one


def test_bench_protect_is_a_command():
    from faceveil.cli import build_parser

    args = build_parser().parse_args(["bench", "protect", "--presets", "default", "--repeats", "1"])
    assert args.presets == "default" and args.repeats == 1


@needs_weights
@pytest.mark.slow
def test_folder_case_batches_the_sample_photos(tmp_path):
    """The folder case runs every sample photo through one protector, faces of consecutive photos together, and
    its floor covers exactly the batches it made."""
    import dataclasses

    from faceveil.bench.protect import _folder_case
    from faceveil.pipeline.protect import ProtectSettings

    base = ProtectSettings(surrogates=["mobileface"], verify=False)
    settings = dataclasses.replace(base, attack=dataclasses.replace(base.attack, steps=1))
    name, faces, run, floor, stages = _folder_case(settings, tmp_path)
    assert name == "folder" and faces >= 20  # the six sample photos hold 22 faces
    stages.clear()
    run()
    floor()
    assert len(list(tmp_path.iterdir())) == 6
    # the job's stage clock saw every stage of the run (no verification in the bench)
    assert set(stages.seconds) == {"read", "detect", "optimise", "paste", "write"}
    assert all(t > 0 for t in stages.seconds.values())


@needs_weights
def test_network_clock_times_forward_and_backward_inside_a_run():
    """The in-run network time covers each recogniser's forward and backward, is part of the run's time, and
    its hooks are gone afterwards."""
    import time

    import torch

    from faceveil.bench.network_clock import NetworkClock
    from faceveil.models import zoo

    model = zoo.load("mobileface")
    x = torch.rand(2, 3, 112, 112, requires_grad=True)
    with NetworkClock().timing([model]) as forward_only, torch.no_grad():
        for _ in range(3):
            model(x)
    start = time.perf_counter()
    with NetworkClock().timing([model]) as clock:
        model(x).square().sum().backward()
        torch.rand(512, 512) @ torch.rand(512, 512)  # not a network's: not counted
    total = time.perf_counter() - start
    # one forward + backward against three forwards alone: the backward is counted, and only the network's time
    assert 0 < clock.seconds < total and forward_only.seconds > 0
    assert clock.seconds > 0.3 * forward_only.seconds / 3
    assert not model._forward_hooks and not model._forward_pre_hooks and not model._backward_hooks


@needs_weights
@pytest.mark.slow
def test_network_clock_counts_each_of_two_networks_on_one_input_once():
    """Two recognisers of one geometry read the same crops tensor: each network's backward is timed from its own
    output node to its own view of the input, so the clock never counts one network's backward twice (with hooks
    on the shared input, both would stop only when both were done) and stays below the run's time."""
    import time

    import torch

    from faceveil.bench.network_clock import NetworkClock
    from faceveil.models import zoo

    models = [zoo.load("mobileface"), zoo.load("mfn512")]
    x = torch.rand(4, 3, 112, 112, requires_grad=True)
    crops = x * 1.0  # a non-leaf tensor both read, as the optimiser's crops are
    start = time.perf_counter()
    with NetworkClock().timing(models) as clock:
        sum(m(crops).square().sum() for m in models).backward()
    assert 0 < clock.seconds < time.perf_counter() - start
    reference = x.grad.clone()
    x.grad = None
    sum(m(x * 1.0).square().sum() for m in models).backward()
    assert torch.equal(x.grad, reference)  # the clock's views change no value


@needs_weights
@pytest.mark.slow
def test_bench_protect_runs_every_case_without_refusing_its_own_files():
    """The photo case and the folder case write into their own folders: the whole bench runs (it once stopped at
    'sample6.jpg exists: not overwritten' when the folder case wrote where the photo case had)."""
    import dataclasses

    from faceveil.bench.protect import run
    from faceveil.pipeline.protect import ProtectSettings

    base = ProtectSettings(surrogates=["mobileface"], verify=False)
    settings = dataclasses.replace(base, attack=dataclasses.replace(base.attack, steps=1))
    rows, info = run({"tiny": settings}, repeats=1, progress=False)
    assert [r["case"] for r in rows] == ["photo", "folder", "optimise-1", "optimise-16"]
    assert all(r["seconds_per_face"] > 0 for r in rows) and info["threads"] >= 1
