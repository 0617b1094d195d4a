"""`faceveil eval identification|robustness --protocol tip-im --engine ray`: the protection runs of an evaluation
spread over a pool of Ray actors; everything else (split, landmarks, galleries, collecting, scoring) stays in the
submitting process.

A protection run is one job per probe batch (faceveil.evaluate.protocols.tip_im.MaskJob: files, landmarks,
surrogates, settings); `RayMasks` is the protocol's MaskMap: a Ray dataset of the pickled jobs, `map_batches` one job
per call over an ActorPoolStrategy of `workers` actors, each with one MaskComputer (the surrogates loaded once per
surrogate set, one thread) that returns the batch's mask. The masks come back in job order, bit for bit what a local
run on one thread computes (the core seeds each job's attack itself), so the rows are the local engine's. As for
`protect --engine ray`, every node must see the dataset at the same path and have the weights fetched."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from faceveil.distributed.ray_engine import ACTOR_ENV, CPUS_PER_ACTOR, connect, import_ray
from faceveil.errors import FaceveilError

if TYPE_CHECKING:
    from faceveil.evaluate.protocols.tip_im import MaskJob


class MaskActor:
    """One Ray actor: one MaskComputer (the surrogate models loaded once per surrogate set), one thread."""

    def __init__(self) -> None:
        from faceveil.evaluate.protocols.tip_im import MaskComputer
        from faceveil.runtime import prepare_process

        prepare_process()
        torch.set_num_threads(CPUS_PER_ACTOR)  # the float sums of a local run on one thread (see ray_engine)
        self.computer = MaskComputer()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        masks = [pickle.dumps(self.computer(pickle.loads(job)).numpy()) for job in batch["job"]]
        return {"index": np.asarray(batch["index"]), "mask": np.asarray(masks, dtype=object)}


class RayMasks:
    """A tip_im.MaskMap on Ray. Use as a context manager: joins the cluster at `address` (or starts a local instance
    with `workers` CPUs) on entry, and leaves it (stops the local one) on exit."""

    def __init__(self, address: str | None = None, workers: int = 2) -> None:
        if workers < 1:
            raise FaceveilError(f"--workers must be at least 1, got {workers}")
        self.address, self.workers = address, workers
        self.ray: Any = None
        self.started_here = False

    def __enter__(self) -> RayMasks:
        self.ray = import_ray()
        self.started_here = connect(self.ray, self.address, self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started_here:
            self.ray.shutdown()

    def __call__(self, jobs: list[MaskJob]) -> Iterator[torch.Tensor]:
        if self.ray is None:
            raise RuntimeError("RayMasks is used inside `with`")
        return _in_order(_mask_rows(self.ray, jobs, self.workers), len(jobs))


def _mask_rows(ray: Any, jobs: list[MaskJob], workers: int) -> Iterator[dict]:
    """The actors' (index, mask) rows, as jobs finish."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the protocol's bar counts batches
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    items = [{"index": i, "job": pickle.dumps(job)} for i, job in enumerate(jobs)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    masks = dataset.map_batches(
        MaskActor, batch_size=1, batch_format="numpy", num_cpus=CPUS_PER_ACTOR,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(items)) or 1),
        runtime_env={"env_vars": ACTOR_ENV})
    return masks.iter_rows()


def _in_order(rows: Iterator[dict], count: int) -> Iterator[torch.Tensor]:
    """The masks in job order (rows arrive as jobs finish; a retried job's second row is dropped)."""
    pending: dict[int, bytes] = {}
    following = 0
    try:
        for row in rows:
            index = int(row["index"])
            if index >= following:
                pending.setdefault(index, row["mask"])
            while following in pending:
                yield torch.from_numpy(pickle.loads(pending.pop(following)))
                following += 1
    except Exception as exc:  # the cluster failed (an evaluation has no partial result): one line, not a traceback
        raise FaceveilError("ray: " + " ".join(str(exc).split())[:250]) from exc
    if following < count:
        raise FaceveilError(f"ray: {count - following} of {count} probe batches came back without a mask")
