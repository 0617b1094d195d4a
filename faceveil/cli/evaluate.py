"""`faceveil eval verification` (LFW View-2 accuracy per model) and `faceveil eval identification` on both
protocols: tip-im (image-specific protection, TIP-IM §5.1) and opom (person masks, OPOM §4.1).

The opom protocol's defaults are the OPOM paper's (L-inf eps 8, 16 iterations, method opom-convex, no momentum
unless given), not the TIP-IM defaults the tip-im protocol uses. Its --method takes a comma list (one run, clean
embeddings computed once, one row per method and judge); a name ending in "+md" adds momentum 1 and DFANet dropout
(§3.2.3)."""

from __future__ import annotations

import argparse
import time

from faceveil.cli.common import (
    Groups,
    add_report_flag,
    count_or_zero,
    dataset_root,
    dropout_choice,
    emit,
    fraction,
    non_negative,
    positive,
    positive_int,
    seed_value,
    smoothing_size,
    ssim_target,
    threads,
)
from faceveil.cli.engine import add_engine_flags, mask_map, require_local_unless_tip_im
from faceveil.errors import FaceveilError
from faceveil.methods import registry
from faceveil.pipeline import presets


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    evaluate = groups["eval"]
    p = evaluate.add_parser("verification", help="LFW View-2 10-fold verification accuracy per model")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--models", default="all", help="comma list or 'all'")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only N pairs (stratified over folds)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--save-thresholds", metavar="FILE", help="write the calibrated thresholds (registry data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_report_flag(p)
    p.set_defaults(func=_cmd_verification)
    p = evaluate.add_parser("identification", help="TIP-IM identification protocol: rank-1/5 rates under protection")
    _add_identification_flags(p)
    p.set_defaults(func=_cmd_identification)


def _add_identification_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="tip-im", choices=["tip-im", "opom"],
                   help="tip-im: image-specific protection (TIP-IM §5.1); opom: person masks (OPOM §4.1)")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--method", default=None, help=f"tip-im protocol: {', '.join(registry.names('image'))} "
                   "(default pgd); "
                   "opom protocol: see `faceveil enroll --help` (default opom-convex), or a comma list run together "
                   "(one row per method and judge); a name ending in +md adds momentum 1 and DFANet dropout at each "
                   "surrogate's calibrated rate")
    p.add_argument("--surrogates", default=None, help="comma list (default: leave-one-family-out per judge)")
    p.add_argument("--judges", default="all", help="comma list or 'all'")
    p.add_argument("--mode", default="crops", choices=["crops", "photos", "users"],
                   help="crops: perturb the aligned face (the paper); photos: whole photo, saved, re-detected; "
                        "users (opom protocol): what users get, enroll -> .fvmask -> apply -> saved JPEG, re-read "
                        "and re-detected")
    p.add_argument("--norm", default=None, choices=["linf", "l2"],
                   help="opom protocol, users mode: the budget norm as enroll takes it (default each method's "
                        "paper's: l2 1200 for AdvCloak, linf 8 otherwise; --eps in the norm's units)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the first N protected identities of the seeded order (tip-im: of its 500; opom: of "
                        "those with --min-images images)")
    p.add_argument("--extra", type=count_or_zero, default=None, metavar="N",
                   help="tip-im protocol only: further gallery identities (default 500, or 50 with --limit)")
    p.add_argument("--eps", type=positive, default=None, help="L-inf budget, 0..255 units (default: the protocol's "
                   "paper, tip-im 12, opom 8)")
    p.add_argument("--alpha", type=positive, default=None, help="step size, 0..255 units (default: tip-im 1.5, opom 1)")
    p.add_argument("--iters", type=positive_int, default=None, help="iterations (default: tip-im 50, opom 16)")
    p.add_argument("--momentum", type=non_negative, default=None, help="MI-FGSM momentum (default: tip-im 1, opom 0)")
    p.add_argument("--diversity", type=fraction, default=0.0,
                   help="tip-im protocol: input-diversity probability added to any method (DIM/MT-DIM use 0.5 anyway)")
    p.add_argument("--smoothing", type=smoothing_size, default=0, metavar="K",
                   help="tip-im protocol: TI gradient smoothing, odd Gaussian kernel size, canonical pixels (0 = off)")
    p.add_argument("--jitter", type=non_negative, default=None, help="alignment jitter (default: 0 crops, 2 photos)")
    p.add_argument("--gamma", type=non_negative, default=0.0,
                   help="tip-im protocol only: TIP-IM MMD naturalness weight")
    p.add_argument("--batch", type=positive_int, default=8, help="probes protected at once")
    p.add_argument("--masks", type=positive_int, default=1, metavar="N_M",
                   help="opom protocol only: diverse masks per person (Table 6: M-O per mask, M-M per mask pair)")
    p.add_argument("--dropout", type=dropout_choice, default=None, metavar="P|calibrated",
                   help="opom protocol only: DFANet feature-dropout rate while learning masks (Tables 4-5), or "
                        "'calibrated' (each surrogate at the rate it still recognises under); default 0, in users "
                        "mode enroll's")
    p.add_argument("--budget", default=None, choices=["linf", "texture"],
                   help="opom protocol only: texture shapes the L-inf budget by each person's face texture "
                        "(default linf, in users mode enroll's)")
    p.add_argument("--ssim", type=ssim_target, default=None, metavar="T",
                   help="opom protocol only: a visibility budget, masks kept at and scaled onto face-area SSIM T "
                        "on the person's training photos (0 = off; default 0, in users mode enroll's)")
    p.add_argument("--psnr", type=non_negative, default=None, metavar="DB",
                   help="opom protocol only: also a face-area PSNR floor (0 = off)")
    p.add_argument("--distractors", default=None, metavar="N|all",
                   help="opom protocol only: distractor images, a seeded sample of LFW (default all, or 2000 with "
                        "--limit)")
    p.add_argument("--train-images", type=positive_int, default=10,
                   help="opom protocol only: images per person that learn the mask (paper: 10)")
    p.add_argument("--test-images", default=None, metavar="N|all",
                   help="opom protocol only: test images per person, a seeded choice among the rest (default 5, "
                        "so identities with many images do not dominate; 'all' = no cap)")
    p.add_argument("--min-images", type=positive_int, default=12,
                   help="opom protocol only: identities with at least this many images are protected")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_flags(p)
    add_report_flag(p)


def _cmd_verification(args: argparse.Namespace) -> int:
    from faceveil.evaluate import verification
    from faceveil.models import zoo

    root = dataset_root(args.dataset)
    models = zoo.parse_models(args.models)
    rows, info = verification.run(root, models, args.limit, progress=not args.quiet)
    settings = {"dataset": str(root), "models": models, "limit": args.limit, **info}
    emit("eval verification", settings, rows, args.json, report=args.report)
    if args.save_thresholds:
        verification.save_thresholds(rows, args.save_thresholds)
    return 0


def _cmd_identification(args: argparse.Namespace) -> int:
    if args.protocol == "opom":
        return _opom_identification(args)
    return _tip_im_identification(args)


# ----------------------------------------------------------------------------------------------- tip-im protocol


def _tip_im_identification(args: argparse.Namespace) -> int:
    from faceveil.attacks.core import AttackConfig
    from faceveil.evaluate.protocols import tip_im as identification
    from faceveil.models import zoo

    if args.mode == "users":
        raise FaceveilError("--mode users is the opom protocol's (person masks through enroll and apply); the "
                            "tip-im protocol's photos mode is what protect does")
    if args.norm is not None:
        raise FaceveilError("--norm is an opom protocol flag (users mode)")
    for key in ("eps", "alpha", "iters", "momentum"):  # TIP-IM §5.1 unless given (the opom protocol has its own)
        if getattr(args, key) is None:
            setattr(args, key, presets.PAPER_DEFAULTS[key])
    args.method = args.method or "pgd"
    registry.check_kind(args.method, "image")
    root = dataset_root(args.dataset)
    judges = zoo.parse_models(args.judges)
    surrogates = zoo.parse_models(args.surrogates) if args.surrogates else None
    jitter = args.jitter if args.jitter is not None else (2.0 if args.mode == "photos" else 0.0)
    attack = AttackConfig(eps=args.eps / 255, alpha=args.alpha / 255, steps=args.iters, norm="linf",
                          momentum=args.momentum, diversity=args.diversity, jitter=jitter,
                          smoothing=args.smoothing, seed=args.seed)
    settings = identification.Settings(method=args.method, mode=args.mode, attack=attack, gamma=args.gamma,
                                       batch=args.batch, progress=not args.quiet)
    with mask_map(args) as masks:
        rows, info = identification.run(root, judges, surrogates, settings, args.seed, args.limit, args.extra, masks)
    meta = {"protocol": args.protocol, "dataset": str(root), "method": args.method, "mode": args.mode,
            "judges": judges, "surrogates": surrogates or "leave-one-family-out", "eps": args.eps,
            "alpha": args.alpha, "iters": args.iters, "momentum": args.momentum, "diversity": args.diversity,
            "jitter": jitter, "smoothing": args.smoothing,
            "gamma": args.gamma, "batch": args.batch, "threads": threads(), **_engine(args), **info}
    emit("eval identification", meta, rows, args.json, report=args.report)
    return 0


def _engine(args: argparse.Namespace) -> dict:
    """Where the masks were computed (ray: the actors, one thread each)."""
    if args.engine != "ray":
        return {"engine": "local"}
    return {"engine": "ray", "workers": args.workers, "address": args.address or "local instance"}


# ----------------------------------------------------------------------------------------------- opom protocol


def _opom_identification(args: argparse.Namespace) -> int:
    from faceveil.datasets.lfw import identities
    from faceveil.evaluate.protocols import opom as protocol
    from faceveil.models import zoo

    reject_tip_im_flags(args)
    require_local_unless_tip_im(args)
    root = dataset_root(args.dataset)
    judges = zoo.parse_models(args.judges)
    surrogates = zoo.parse_models(args.surrogates) if args.surrogates else None
    names = method_names(args.method)
    if args.batch < 1:
        raise FaceveilError(f"--batch must be at least 1, got {args.batch}")
    cap = distractor_count(args.distractors, args.limit)
    per_person = test_image_cap(args.test_images)
    if args.norm is not None and args.mode != "users":
        raise FaceveilError("--norm is for --mode users (the crops and photos modes use the paper's L-inf budget)")
    methods = [protocol.registry_method(name, args.masks, _opom_base(args, name)) for name in names]
    if args.mode == "users":
        protocol.check_users_methods(methods)
    attack = methods[0].settings.attack
    split = protocol.make_split(identities(root), args.seed, args.limit, args.min_images, args.train_images, cap,
                                per_person)
    start = time.perf_counter()
    rows, info = protocol.run_methods(split, judges, surrogates, methods)
    universal = [m.settings.method for m in methods if m.settings.universal]
    meta = {"protocol": "opom", "dataset": str(root), "method": ",".join(names), "mode": args.mode,
            "masks": args.masks, "universal_mask": bool(universal) if len(names) == 1 else universal,
            "judges": judges, "surrogates": surrogates or "leave-one-family-out",
            "norm": attack.norm, **_budget_fields(methods), "iters": attack.steps,
            "momentum": attack.momentum, "dropout": attack.dropout, "model_dropout": dict(attack.model_dropout),
            "budget": attack.budget, "ssim": attack.ssim_target, "psnr": attack.psnr_floor, "jitter": attack.jitter,
            "random_start": attack.random_start, "seed": args.seed, "limit": args.limit,
            "distractors": "all" if cap is None else cap, "batch": args.batch, "threads": threads(),
            **_transfer_note(names), **info, "seconds": round(time.perf_counter() - start, 2)}
    emit("eval identification", meta, rows, args.json, report=args.report)
    return 0


def _budget_fields(methods) -> dict:
    """eps and alpha in the user's units (0..255; an L2 norm at the 112-crop scale), one value per method when the
    methods' budgets differ (users mode: each method's paper norm)."""
    from faceveil.pipeline.person import user_budget

    budgets = {m.settings.method: [round(v, 4) for v in user_budget(m.settings.attack)] for m in methods}
    if len({tuple(b) for b in budgets.values()}) == 1:
        eps, alpha = next(iter(budgets.values()))
        return {"eps": eps, "alpha": alpha}
    return {"eps": {k: b[0] for k, b in budgets.items()}, "alpha": {k: b[1] for k, b in budgets.items()},
            "norm_per_method": {m.settings.method: m.settings.attack.norm for m in methods}}


def _opom_base(args: argparse.Namespace, method: str):
    """The protocol's shared settings for one method: the paper's L-inf budget (crops, photos), or in users mode
    the budget enroll resolves from the same flags (the method's paper norm unless --norm)."""
    from faceveil.evaluate.protocols import opom as protocol
    from faceveil.pipeline.person import enroll_settings

    if args.mode == "users":
        attack = enroll_settings(name="eval", method=protocol.split_method_name(method)[0], seed=args.seed,
                                 eps=args.eps, norm=args.norm, iters=args.iters, alpha=args.alpha,
                                 momentum=args.momentum, dropout=args.dropout, mode="photos",
                                 jitter=args.jitter, budget=args.budget, ssim=args.ssim, psnr=args.psnr).attack
    else:
        attack = protocol.attack_config(args.seed, args.mode, args.eps, args.alpha, args.iters, args.momentum,
                                        args.dropout if args.dropout is not None else 0.0, args.jitter,
                                        budget=args.budget or "linf", ssim_target=args.ssim or 0.0,
                                        psnr_floor=args.psnr or 0.0)
    return protocol.Settings(mode=args.mode, attack=attack, batch=args.batch, progress=not args.quiet)


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
    """--method a,b,c -> the method names (default: the protocol's DEFAULT_METHOD)."""
    from faceveil.evaluate.protocols.opom import DEFAULT_METHOD

    names = [name.strip() for name in (text or DEFAULT_METHOD).split(",")]
    if not all(names):
        raise FaceveilError(f"--method: an empty name in the comma list {text!r}")
    if len(set(names)) < len(names):
        raise FaceveilError("--method lists a method twice")
    return names


def reject_tip_im_flags(args: argparse.Namespace) -> None:
    """The tip-im protocol's own flags mean nothing here: say so instead of ignoring them."""
    if getattr(args, "extra", None) is not None:
        raise FaceveilError("--extra is a tip-im protocol flag; the opom protocol's gallery is set by --distractors")
    if getattr(args, "gamma", None):
        raise FaceveilError("--gamma (TIP-IM's naturalness weight) is a tip-im protocol flag; the opom protocol "
                            "has no such term")


def _transfer_note(names: list[str]) -> dict:
    """What "+md" meant in this run (its methods ignore --momentum and --dropout)."""
    from faceveil.attacks.core import calibrated_dropout
    from faceveil.evaluate.protocols import opom as protocol

    if not any(protocol.split_method_name(name)[1] for name in names):
        return {}
    return {"transfer_suffix": {"suffix": protocol.TRANSFER_SUFFIX, "momentum": protocol.TRANSFER_MOMENTUM,
                                "dropout": protocol.TRANSFER_DROPOUT, "rates": dict(calibrated_dropout())}}
