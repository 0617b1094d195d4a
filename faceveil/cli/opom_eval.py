"""`faceveil eval identification --protocol opom`: the OPOM person-mask protocol (dispatched from faceveil.cli).

Defaults are the OPOM paper's (§4.1: L-inf eps 8, 16 iterations, method opom-convex, no momentum unless given),
not the TIP-IM defaults the tip-im protocol uses. --method takes a comma list (one run, clean embeddings computed
once, one row per method and judge); a name ending in "+md" adds momentum 1 and DFANet dropout (§3.2.3)."""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from faceveil.attacks.core import AttackConfig
from faceveil.errors import FaceveilError

DEFAULT_METHOD = "opom-convex"


def _count_or_all(text: str, flag: str, minimum: int, why: str = "") -> int | None:
    """'N' -> N (at least `minimum`), 'all' -> None; one-line errors otherwise."""
    if str(text).strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise FaceveilError(f"{flag} takes a number or 'all', got {text!r}") from None
    if value < minimum:
        raise FaceveilError(f"{flag} must be at least {minimum}{why}, got {value}")
    return value


def distractor_count(text: str | None, limit: int | None) -> int | None:
    """--distractors N|all -> a cap, or None for all of LFW; unset: all, or DISTRACTORS_LIMITED with --limit."""
    from faceveil.evaluate.protocols.opom import DISTRACTORS_LIMITED

    if text is None:
        return DISTRACTORS_LIMITED if limit is not None else None
    return _count_or_all(text, "--distractors", 1)


def test_image_cap(text: str | None) -> int | None:
    """--test-images N|all -> test images per person, or None for all; unset: the protocol's TEST_IMAGES."""
    from faceveil.evaluate.protocols.opom import TEST_IMAGES

    if text is None:
        return TEST_IMAGES
    return _count_or_all(text, "--test-images", 2, " (one in the gallery, one probe)")


def method_names(text: str | None) -> list[str]:
    """--method a,b,c -> the method names (default: DEFAULT_METHOD)."""
    names = [name.strip() for name in (text or DEFAULT_METHOD).split(",")]
    if not all(names):
        raise FaceveilError(f"--method: an empty name in the comma list {text!r}")
    return names


def reject_tip_im_flags(args: argparse.Namespace) -> None:
    """The tip-im protocol's own flags mean nothing here: say so instead of ignoring them."""
    if getattr(args, "extra", None) is not None:
        raise FaceveilError("--extra is a tip-im protocol flag; the opom protocol's gallery is set by --distractors")
    if getattr(args, "gamma", None):
        raise FaceveilError("--gamma (TIP-IM's naturalness weight) is a tip-im protocol flag; the opom protocol "
                            "has no such term")


def attack_config(args: argparse.Namespace) -> AttackConfig:
    """The OPOM paper's configuration (faceveil.methods.opom.learners.paper_config) with the flags that were given."""
    from faceveil.methods.opom.learners import paper_config

    cfg = paper_config(args.seed)
    changes: dict = {"dropout": args.dropout,
                     "jitter": args.jitter if args.jitter is not None else (2.0 if args.mode == "photos" else 0.0)}
    if args.eps is not None:
        changes["eps"] = args.eps / 255
    if args.alpha is not None:
        changes["alpha"] = args.alpha / 255
    if args.iters is not None:
        changes["steps"] = args.iters
    if args.momentum is not None:
        changes["momentum"] = args.momentum
    for key in ("eps", "alpha", "dropout", "jitter"):
        if changes.get(key, 0.0) < 0:
            raise FaceveilError(f"--{key} must not be negative")
    if changes.get("dropout", 0.0) >= 1:
        raise FaceveilError("--dropout must be below 1")
    return dataclasses.replace(cfg, **changes)


def eval_identification(args: argparse.Namespace) -> int:
    from faceveil.datasets.lfw import identities, parse_dataset_arg
    from faceveil.evaluate.protocols import opom as protocol
    from faceveil.io.results import emit
    from faceveil.models import zoo

    reject_tip_im_flags(args)
    root = parse_dataset_arg(args.dataset)
    judges = zoo.parse_models(args.judges)
    surrogates = zoo.parse_models(args.surrogates) if args.surrogates else None
    names = method_names(args.method)
    if args.batch < 1:
        raise FaceveilError(f"--batch must be at least 1, got {args.batch}")
    cap = distractor_count(args.distractors, args.limit)
    per_person = test_image_cap(args.test_images)
    attack = attack_config(args)
    base = protocol.Settings(mode=args.mode, attack=attack, batch=args.batch, progress=not args.quiet)
    methods = [protocol.registry_method(name, args.masks, base) for name in names]
    split = protocol.make_split(identities(root), args.seed, args.limit, args.min_images, args.train_images, cap,
                                per_person)
    start = time.perf_counter()
    rows, info = protocol.run_methods(split, judges, surrogates, methods)
    universal = [m.settings.method for m in methods if m.settings.universal]
    meta = {"protocol": "opom", "dataset": str(root), "method": ",".join(names), "mode": args.mode,
            "masks": args.masks, "universal_mask": bool(universal) if len(names) == 1 else universal,
            "judges": judges, "surrogates": surrogates or "leave-one-family-out",
            "eps": round(attack.eps * 255, 4), "alpha": round(attack.alpha * 255, 4), "iters": attack.steps,
            "momentum": attack.momentum, "dropout": attack.dropout, "jitter": attack.jitter,
            "random_start": attack.random_start, "seed": args.seed, "limit": args.limit,
            "distractors": "all" if cap is None else cap, "batch": args.batch, "threads": torch.get_num_threads(),
            **_transfer_note(names), **info, "seconds": round(time.perf_counter() - start, 2)}
    emit("eval identification", meta, rows, args.json, report=args.report)
    return 0


def _transfer_note(names: list[str]) -> dict:
    """What "+md" meant in this run (its methods ignore --momentum and --dropout)."""
    from faceveil.evaluate.protocols import opom as protocol

    if not any(protocol.split_method_name(name)[1] for name in names):
        return {}
    return {"transfer_suffix": {"suffix": protocol.TRANSFER_SUFFIX, "momentum": protocol.TRANSFER_MOMENTUM,
                                "dropout": protocol.TRANSFER_DROPOUT}}
