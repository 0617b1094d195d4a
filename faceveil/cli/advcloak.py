"""`faceveil` sub-commands of AdvCloak: `train advcloak` (two-stage generator training),
`train advcloak-export` (the slim generator file that `enroll --method advcloak*` loads), `eval advcloak` (methods
compared on the OPOM protocol at one L2 norm) and `bench advcloak` (mask customisation time, Table 3)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from faceveil.cli.common import (
    Groups,
    add_report_flag,
    dataset_root,
    emit,
    load_average,
    positive,
    positive_int,
    seed_value,
    threads,
)
from faceveil.errors import FaceveilError


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["train"].add_parser(
        "advcloak", help="train the AdvCloak generator (stage I image-specific, stage II person-specific)")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"],
                   help="1: image-specific; 2: person-specific from a finished stage I; both (default)")
    p.add_argument("--subspace", default="convex", choices=["none", "affine", "center", "convex"],
                   help="stage II adversarial loss: none (Eq. 15), affine hull, class centre, convex hull (Eq. 17-19)")
    p.add_argument("--epochs", type=positive, default=1.0, help="epochs of each stage run (fractions allowed)")
    p.add_argument("--epochs-2", type=positive, default=None, help="stage II epochs (default: --epochs)")
    p.add_argument("--identities", type=positive_int, default=None, metavar="N", help="only N training identities")
    p.add_argument("--init", metavar="STAGE1.pt", default=None,
                   help="stage II: take the finished stage I from this file (copied into -o)")
    p.add_argument("--surrogates", default="mobileface,mfn512", help="recognisers the generator is trained against")
    p.add_argument("--batch", type=positive_int, default=8, help="stage I faces per step")
    p.add_argument("--persons", type=positive_int, default=4, help="stage II persons per step")
    p.add_argument("--images-per-person", type=positive_int, default=4, help="stage II faces per person")
    p.add_argument("--lr", type=positive, default=None, help="learning rate (default: 1e-4 stage I, 5e-5 stage II)")
    p.add_argument("--eps", type=positive, default=None, help="norm hinge eps in [0,1] units at 112x112x3 (1.5)")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="STEPS")
    p.add_argument("--resume", action="store_true", help="continue the partial stage held in -o")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--log", metavar="LOG.jsonl", default=None, help="loss log (default: OUT with .log.jsonl)")
    p.add_argument("-o", "--output", required=True, metavar="advcloak.pt", help="checkpoint (written atomically)")
    p.add_argument("--json", metavar="OUT", help="summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = groups["train"].add_parser("advcloak-export", help="slim generator file from an AdvCloak checkpoint")
    p.add_argument("checkpoint", metavar="advcloak.pt")
    p.add_argument("--stage", type=int, default=None, choices=[1, 2], help="default: the last finished stage")
    p.add_argument("-o", "--output", required=True, metavar="GENERATOR.pt")
    p.set_defaults(func=_cmd_export)

    p = groups["eval"].add_parser(
        "advcloak", help="person-mask methods on the OPOM protocol, every mask at one L2 norm (AdvCloak Tables 1-3)")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--methods", default="advcloak-convex,advcloak,opom-convex,fi-uap,advfaces-plus,gap",
                   help="comma list of person-mask methods (see `faceveil enroll --help`)")
    p.add_argument("--l2", type=positive, default=1200.0,
                   help="L2 norm of every mask, 0..255 pixels of the 112x112x3 face (paper: 1200)")
    p.add_argument("--judges", default="all", help="comma list or 'all'")
    p.add_argument("--surrogates", default="mobileface,mfn512",
                   help="surrogates of the optimising methods (the generators' own, so all methods match)")
    p.add_argument("--mode", default="crops", choices=["crops", "photos", "users"],
                   help="crops / photos: masks rescaled to --l2 after learning; users: what users get, every method "
                        "through enroll --norm l2 --eps L2 -> .fvmask -> apply -> saved JPEG, re-read and re-detected")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only N protected identities")
    p.add_argument("--distractors", default=None, metavar="N|all", help="distractor images (default: all; 2000 "
                   "with --limit)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seed", type=seed_value, default=0)
    add_report_flag(p)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

    p = groups["bench"].add_parser("advcloak", help="seconds to make one person's mask from 10 faces (Table 3 t1)")
    p.add_argument("--methods", default="advcloak-convex,advfaces-plus")
    p.add_argument("--faces", type=positive_int, default=10)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=_cmd_bench)


def _cmd_train(args: argparse.Namespace) -> int:
    from faceveil.datasets.lfw import identities
    from faceveil.methods.advcloak import train
    from faceveil.methods.advcloak.data import load_faces, training_identities
    from faceveil.models import zoo

    root = dataset_root(args.dataset)
    output = Path(args.output)
    stages = [1, 2] if args.stage == "both" else [int(args.stage)]
    people = training_identities(identities(root), args.identities, args.seed)
    faces = load_faces(people, progress=not args.quiet)
    data = _starting_checkpoint(output, args, train)
    log = Path(args.log) if args.log else output.with_name(output.name + ".log.jsonl")
    rows = []
    for stage in stages:
        settings = train.TrainSettings(
            stage=stage, subspace=args.subspace,
            epochs=args.epochs_2 if stage == 2 and args.epochs_2 is not None else args.epochs,
            batch=args.batch, persons=args.persons, images_per_person=args.images_per_person, lr=args.lr,
            eps=args.eps if args.eps is not None else train.EPS,
            surrogates=tuple(zoo.parse_models(args.surrogates)), seed=args.seed,
            checkpoint_every=args.checkpoint_every)
        if args.resume and data.get(f"stage{stage}", {}).get("done"):
            continue  # resumed after this stage had finished
        result = train.train_stage(faces, settings, output, data, resume=args.resume, log_path=log,
                                   progress=not args.quiet)
        rows.append({"stage": stage, "subspace": args.subspace if stage == 2 else "", "steps": result.steps,
                     "resumed_from": result.resumed_from, "seconds": round(result.seconds, 1), **result.last})
    meta = {"dataset": str(root), "identities": len(people), "faces": len(faces), "output": str(output),
            "log": str(log), "seed": args.seed, "threads": threads(), "load_average_1min": load_average()}
    emit("train advcloak", meta, rows, args.json)
    return 0


def _starting_checkpoint(output: Path, args: argparse.Namespace, train) -> dict:
    """The checkpoint to continue: -o if it exists, plus --init's stage I; or a fresh one."""
    data = train.read_checkpoint(output) if output.exists() else None
    if args.init:
        source = train.read_checkpoint(Path(args.init))
        if not source.get("stage1", {}).get("done"):
            raise FaceveilError(f"--init {args.init} has no finished stage I")
        if data is None:
            data = {k: v for k, v in source.items() if k != "stage2"}
        elif data.get("stage1", {}).get("step") != source["stage1"]["step"]:
            raise FaceveilError(f"{output} already holds a different stage I than --init {args.init}")
    return data if data is not None else train.new_checkpoint()


def _cmd_export(args: argparse.Namespace) -> int:
    from faceveil.methods.advcloak.generator import export_generator

    info = export_generator(Path(args.checkpoint), Path(args.output), args.stage)
    print(f"wrote {args.output}: stage {info['stage']}, subspace {info.get('subspace')}, "
          f"{info['bytes'] / 1e6:.2f} MB")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from faceveil.cli.evaluate import distractor_count
    from faceveil.datasets.lfw import identities
    from faceveil.evaluate.protocols import advcloak as compare
    from faceveil.evaluate.protocols import opom as protocol
    from faceveil.models import zoo

    root = dataset_root(args.dataset)
    if args.l2 <= 0:
        raise FaceveilError(f"--l2 must be above 0, got {args.l2}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cap = distractor_count(args.distractors, args.limit)
    split = protocol.make_split(identities(root), args.seed, args.limit, distractors=cap)
    settings = compare.CompareSettings(methods, zoo.parse_models(args.judges), zoo.parse_models(args.surrogates),
                                       args.l2, args.mode, args.batch, args.seed, not args.quiet)
    start = time.perf_counter()
    rows, info = compare.run(split, settings)
    meta = {"protocol": "opom", "dataset": str(root), "mode": args.mode, "limit": args.limit,
            "distractors": "all" if cap is None else cap, "seed": args.seed, **info,
            "threads": threads(), "load_average_1min": load_average(),
            "seconds": round(time.perf_counter() - start, 1)}
    emit("eval advcloak", meta, rows, args.json, report=args.report)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from faceveil.evaluate.protocols.advcloak import mask_time

    rows = [mask_time(m.strip(), args.faces, args.repeats) for m in args.methods.split(",") if m.strip()]
    emit("bench advcloak", {"faces": args.faces, "repeats": args.repeats,
                            "load_average_1min": load_average()}, rows, args.json)
    return 0

