"""`faceveil` sub-commands of the opom wing: `enroll` (learn a person's mask file), `apply` (paste it on that person's
faces in photos and videos) and `bench apply` (how long each takes)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from faceveil.cli.common import Groups
from faceveil.report import add_report_flag, batch_header

ENROLL_DEFAULTS = {"eps": 8.0, "iters": 16, "alpha": 1.0}  # OPOM §4.2.1 and Algorithms 1-2 (0..255 units)
# --norm l2: AdvCloak's comparison budget (§4.1.4), the L2 norm on 0..255 pixels of the 112x112x3 face
L2_DEFAULT_EPS = 1200.0


def register(groups: Groups) -> None:
    """Adds this wing's sub-commands to the parser groups."""
    _add_enroll(groups["root"])
    _add_apply(groups["root"])
    _add_bench_apply(groups["bench"])


# ----------------------------------------------------------------------------------------------- enroll


def _add_enroll(root) -> None:
    p = root.add_parser("enroll", help="learn one person's privacy mask file from a few photos (OPOM)",
                        description="Learn person-specific masks (OPOM, TPAMI 2022) from the largest face of each "
                                    "image and write them to a .fvmask file for `faceveil apply`.")
    p.add_argument("--name", required=True, help="the person's name (stored in the file)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photos of the person (the largest face is used)")
    p.add_argument("-o", "--output", required=True, metavar="NAME.fvmask")
    p.add_argument("--method", default="opom-convex",
                   help="opom-convex (default), opom-affine, opom-center, fi-uap, fi-uap-plus, fi-uap-all, gd-uap, "
                        "gap, and methods other modules register")
    p.add_argument("--surrogates", default="mobileface,mfn512", help="models the mask is optimised against")
    p.add_argument("--eps", type=float, default=None,
                   help="budget in 0..255 units: L-inf (default 8, OPOM), or with --norm l2 the L2 norm of the "
                        "112x112x3 face (default 1200, AdvCloak)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"],
                   help="budget norm (l2: canonical masks are measured at the 112-crop scale)")
    p.add_argument("--iters", type=int, default=ENROLL_DEFAULTS["iters"], help="iterations (paper: 16)")
    p.add_argument("--alpha", type=float, default=None,
                   help="step size, 0..255 units (paper: 1, the sign step of Algorithms 1-2)")
    p.add_argument("--momentum", type=float, default=0.0, help="momentum mu of Eq. 14 (paper: 1 when used; 0 = off)")
    p.add_argument("--dropout", type=float, default=0.0, help="DFANet feature dropout rate of Eq. 15 (0 = off)")
    p.add_argument("--masks", type=int, default=1, metavar="N_M", help="diverse masks learned together (Eq. 19)")
    p.add_argument("--diversity-weight", type=float, default=None,
                   help="lambda of the mask-to-mask term of Eq. 19 (default 1: the paper's equal constraints)")
    p.add_argument("--mode", default="photos", choices=["photos", "crops"],
                   help="photos: optimise through paste-back into the photo (default); crops: the aligned face")
    p.add_argument("--jitter", type=float, default=None,
                   help="alignment jitter in crop pixels (default 2 in photos mode, 0 in crops mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the report (images used, timings) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_enroll)


def _enroll_settings(args: argparse.Namespace):
    from faceveil.detect.canonical import CANONICAL_ZOOM
    from faceveil.errors import FaceveilError
    from faceveil.methods import opom
    from faceveil.models import zoo
    from faceveil.pipeline.person import EnrollSettings

    eps, alpha = _budget(args)
    if eps <= 0 or (args.norm == "linf" and eps > 255) or alpha <= 0 or args.iters < 0:
        raise FaceveilError("--eps must be above 0 (at most 255 under L-inf), --alpha above 0 and --iters at least 0")
    if not 0 <= args.dropout < 1:
        raise FaceveilError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.masks < 1:
        raise FaceveilError(f"--masks must be at least 1, got {args.masks}")
    jitter = args.jitter if args.jitter is not None else (2.0 if args.mode == "photos" else 0.0)
    attack = opom.paper_config(args.seed)
    # L2 budgets are given at the 112-crop scale; canonical pixels are 1/CANONICAL_ZOOM of a crop pixel per side
    scale = 1 / 255 if args.norm == "linf" else CANONICAL_ZOOM / 255
    attack.eps, attack.alpha, attack.steps, attack.norm = eps * scale, alpha * scale, args.iters, args.norm
    attack.momentum, attack.dropout, attack.jitter = args.momentum, args.dropout, jitter
    weight = args.diversity_weight if args.diversity_weight is not None else opom.DEFAULT_DIVERSITY_WEIGHT
    return EnrollSettings(name=args.name, method=args.method, surrogates=zoo.parse_models(args.surrogates),
                          attack=attack, masks=args.masks, diversity_weight=weight, mode=args.mode)


def _budget(args: argparse.Namespace) -> tuple[float, float]:
    """(eps, alpha) in the user's units: L-inf 0..255 (defaults 8, 1); L2 at the 112-crop scale (default 1200,
    alpha 2.5 eps / iters: the budget is crossed in under half the iterations)."""
    if args.norm == "linf":
        eps = args.eps if args.eps is not None else ENROLL_DEFAULTS["eps"]
        return eps, args.alpha if args.alpha is not None else ENROLL_DEFAULTS["alpha"]
    eps = args.eps if args.eps is not None else L2_DEFAULT_EPS
    return eps, args.alpha if args.alpha is not None else 2.5 * eps / max(args.iters, 1)


def _cmd_enroll(args: argparse.Namespace) -> int:
    from faceveil.errors import FaceveilError
    from faceveil.io.paths import refuse_same_file
    from faceveil.io.results import emit
    from faceveil.pipeline.maskfile import save_mask
    from faceveil.pipeline.person import enroll

    settings = _enroll_settings(args)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise FaceveilError(f"output folder {output.parent} does not exist")
    for image in args.images:
        refuse_same_file(Path(image), output)
    enrolled = enroll([Path(p) for p in args.images], settings, progress=not args.quiet)
    save_mask(enrolled.mask, output)
    a = settings.attack
    report = {"name": enrolled.mask.name, "output": str(output), "method": settings.method,
              "surrogates": settings.surrogates, "masks": settings.masks, "mode": settings.mode,
              "norm": a.norm, "eps": round(_budget(args)[0], 4), "alpha": round(_budget(args)[1], 4), "iters": a.steps,
              "momentum": a.momentum, "dropout": a.dropout, "jitter": a.jitter, "seed": a.seed,
              "diversity_weight": settings.diversity_weight, "references": sorted(enrolled.mask.references),
              "images_used": enrolled.mask.meta["images_used"], "images_given": len(args.images),
              **{k: v for k, v in enrolled.info.items() if k not in ("method", "masks")},
              "threads": _threads(), "load_average_1min": round(os.getloadavg()[0], 2)}
    emit("enroll", report, enrolled.images, args.json)
    print(f"wrote {output}: {settings.masks} mask(s) of {enrolled.mask.name} from "
          f"{enrolled.mask.meta['images_used']} image(s) in {enrolled.info['seconds']:.1f} s", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- apply


def _add_apply(root) -> None:
    p = root.add_parser("apply", help="paste an enrolled person's mask on their faces in photos and mp4 videos",
                        description="Find the enrolled person's faces (references in the .fvmask) and paste their "
                                    "mask on them; other faces are left alone unless --all-faces.")
    p.add_argument("mask", metavar="NAME.fvmask")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="photos, videos or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--all-faces", action="store_true", help="mask every detected face, not only the person's")
    p.add_argument("--mask-index", type=int, default=0, metavar="K", help="which of the file's diverse masks (0..)")
    p.add_argument("--format", default="same", choices=["same", "png", "jpg"])
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--keep-metadata", action="store_true", help="keep EXIF (location, camera); stripped by default")
    p.add_argument("--copy-unprotected", action="store_true", help="copy photos without the person unchanged")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--json", metavar="REPORT", help="per-file report (.json, or .jsonl streamed)")
    add_report_flag(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_apply)


def _cmd_apply(args: argparse.Namespace) -> int:
    from faceveil.io.paths import ensure_safe_out_dir
    from faceveil.pipeline.batch import expand_inputs, run_batch
    from faceveil.pipeline.maskfile import load_mask
    from faceveil.pipeline.person import ApplySettings, MaskApplier

    mask = load_mask(args.mask)
    settings = ApplySettings(all_faces=args.all_faces, mask_index=args.mask_index, fmt=args.format,
                             jpeg_quality=args.jpeg_quality, keep_metadata=args.keep_metadata,
                             copy_unprotected=args.copy_unprotected)
    for raw in args.inputs:  # before expanding: the output folder is excluded from the inputs
        ensure_safe_out_dir(Path(raw) / "x" if Path(raw).is_dir() else Path(raw), Path(args.output))
    items = expand_inputs(args.inputs, kinds=("image", "video"), exclude=args.output, recursive=args.recursive)
    applier = MaskApplier(mask, settings, Path(args.output))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    report = run_batch(items, applier, report_path=args.json, quiet=args.quiet, desc="apply",
                       header=batch_header("apply", settings))
    _print_apply_table(report.results)
    if args.report:  # also after Ctrl-C: the photos done so far
        from faceveil.report import write_report

        write_report(args.report, "apply", report.to_dict(), progress=not args.quiet)
    if report.interrupted:
        return 130
    return 2 if any(r.status == "error" for r in report.results) else 0


def _print_apply_table(results) -> None:
    lines = ["| file | status | faces | masked | skipped | message |", "|---|---|---|---|---|---|"]
    for r in results:
        d = r.details or {}
        found = d.get("faces_detected", d.get("tracks", ""))
        masked = d.get("masked", d.get("masked_tracks", ""))
        skipped = d.get("skipped", d.get("skipped_tracks", ""))
        lines.append(f"| {Path(r.file).name} | {r.status} | {found} | {masked} | {skipped} | {r.message} |")
    print("\n".join(lines))
    print("faces = detected (tracks for videos); masked = the enrolled person's; skipped = other people")


# ----------------------------------------------------------------------------------------------- bench


def _add_bench_apply(bench) -> None:
    p = bench.add_parser("apply", help="seconds to enroll 10 photos, to apply on a 12 MP photo, and 720p video fps")
    p.add_argument("--images", type=int, default=10, help="photos enrolled (LFW person if present, else samples)")
    p.add_argument("--iters", type=int, default=16, help="enroll iterations (paper: 16)")
    p.add_argument("--repeats", type=int, default=3, help="12 MP apply repeats (median)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the generated 720p clip")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench_apply)


def _cmd_bench_apply(args: argparse.Namespace) -> int:
    from faceveil.bench import apply as bench_apply
    from faceveil.io.results import emit

    rows, info = bench_apply.run(args.images, args.iters, args.repeats, args.seconds, progress=not args.quiet)
    settings = {"images": args.images, "iters": args.iters, "repeats": args.repeats, "seconds": args.seconds,
                "threads": _threads(), "load_average_1min": round(os.getloadavg()[0], 2), **info}
    emit("bench apply", settings, rows, args.json)
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()
