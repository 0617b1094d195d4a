"""`faceveil` sub-commands of person masks: `enroll` (learn a person's mask file), `apply` (paste it on that person's
faces in photos and videos) and `bench apply` (how long each takes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from faceveil.cli.common import (
    Groups,
    add_output_flags,
    add_report_flag,
    check_report_targets,
    count_or_zero,
    dropout_choice,
    emit,
    finish_batch,
    load_average,
    non_negative,
    number_in,
    positive,
    positive_int,
    print_judge_table,
    seed_value,
    ssim_target,
    table_stream,
    threads,
)
from faceveil.errors import FaceveilError
from faceveil.io.paths import DEFAULT_JPEG_QUALITY, FORMAT_CHOICES
from faceveil.methods import registry
from faceveil.pipeline.batch import printable
from faceveil.pipeline.presets import ENROLL_DEFAULTS, ENROLL_STRENGTHS


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
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
    p.add_argument("--method", default="opom-convex",  # no choices: an unknown name is the registry's one-line error
                   help="person method (default opom-convex): " + "; ".join(
                       f"{e.name}: {e.summary}" for e in map(registry.entry, registry.names("person"))))
    p.add_argument("--strength", default="mid", choices=list(ENROLL_STRENGTHS),
                   help="mid (default): OPOM's own budget (L-inf 8, 16 iterations), a light mask that lowers the "
                        "similarity but does not defeat a 1:1 check; high: texture budget of mean L-inf 16, 40 "
                        "iterations, momentum 1, which did defeat most judges in the README's example with a mask "
                        "you can see (face SSIM 0.80). Values given explicitly win over the strength's")
    p.add_argument("--surrogates", default="mobileface,mfn512", help="models the mask is optimised against")
    p.add_argument("--eps", type=positive, default=None,
                   help="budget in 0..255 units: L-inf (default 8, OPOM; at most 16, a mask file's limit), or with "
                        "--norm l2 the L2 norm of the 112x112x3 face (default 1200, AdvCloak; at most 2400)")
    p.add_argument("--norm", default=None, choices=["linf", "l2"],
                   help="budget norm, default each method's paper's: l2 for the AdvCloak methods (1200), linf for "
                        "the others (8); l2 is measured on what is pasted, at the 112-crop scale")
    p.add_argument("--iters", type=number_in(0, 100_000, integer=True), default=None,
                   help=f"iterations, 0..100000 (default: the strength's; paper and mid {ENROLL_DEFAULTS['iters']})")
    p.add_argument("--alpha", type=positive, default=None,
                   help="step size, 0..255 units (paper: 1, the sign step of Algorithms 1-2)")
    p.add_argument("--momentum", type=number_in(0, 10), default=None,
                   help=f"momentum mu of Eq. 14 (paper: 1 when used; 0 = off; default {ENROLL_DEFAULTS['momentum']})")
    p.add_argument("--dropout", type=dropout_choice, default=None, metavar="P|calibrated",
                   help="DFANet feature dropout of Eq. 15: one rate for every surrogate (0 = off), or 'calibrated': "
                        f"each surrogate at the rate it still recognises under (default {ENROLL_DEFAULTS['dropout']})")
    p.add_argument("--budget", default=None, choices=["linf", "texture"],
                   help="texture: the L-inf budget shaped by the face's texture (larger in hair, brows and edges, "
                        f"smaller on flat skin; --eps is its mean over the face; default {ENROLL_DEFAULTS['budget']} "
                        "under L-inf)")
    p.add_argument("--ssim", type=ssim_target, default=None, metavar="T",
                   help="visibility budget: the mask is kept at face-area SSIM T on the person's photos and scaled "
                        f"onto it (0 = off; default {ENROLL_DEFAULTS['ssim']})")
    p.add_argument("--psnr", type=non_negative, default=None, metavar="DB",
                   help="with --ssim: also keep the face-area PSNR at or above DB (0 = off)")
    p.add_argument("--masks", type=number_in(1, 64, integer=True), default=1, metavar="N_M",
                   help="diverse masks learned together (Eq. 19)")
    p.add_argument("--diversity-weight", type=non_negative, default=None,
                   help="lambda of the mask-to-mask term of Eq. 19 (default 1: the paper's equal constraints)")
    p.add_argument("--mode", default="photos", choices=["photos", "crops"],
                   help="photos: optimise through paste-back into the photo (default); crops: the aligned face")
    p.add_argument("--jitter", type=number_in(0, 16), default=None,
                   help="alignment jitter in crop pixels (default 2 in photos mode, 0 in crops mode)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--json", metavar="OUT", help="write the report (images used, timings) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_enroll)


def _enroll_settings(args: argparse.Namespace):
    from faceveil.pipeline.person import enroll_settings

    return enroll_settings(name=args.name, method=args.method, seed=args.seed, surrogates=args.surrogates,
                           eps=args.eps, norm=args.norm, iters=args.iters, alpha=args.alpha, momentum=args.momentum,
                           dropout=args.dropout, masks=args.masks, diversity_weight=args.diversity_weight,
                           mode=args.mode, jitter=args.jitter, budget=args.budget, ssim=args.ssim, psnr=args.psnr,
                           strength=args.strength)


def _cmd_enroll(args: argparse.Namespace) -> int:
    from faceveil.io import atomic
    from faceveil.io.paths import refuse_same_file
    from faceveil.pipeline.maskfile import save_mask
    from faceveil.pipeline.person import enroll, user_budget

    settings = _enroll_settings(args)
    eps, alpha = user_budget(settings.attack)
    output = Path(args.output)
    atomic.check_target(output)  # before the compute: a link or a folder is refused at once
    if not output.parent.is_dir():
        raise FaceveilError(f"output folder {output.parent} does not exist")
    for image in args.images:
        refuse_same_file(Path(image), output)
    enrolled = enroll([Path(p) for p in args.images], settings, progress=not args.quiet,
                      notice=lambda line: print(f"faceveil: {line}", file=sys.stderr))
    save_mask(enrolled.mask, output)
    a = settings.attack
    report = {"name": enrolled.mask.name, "output": str(output), "method": settings.method, "strength": args.strength,
              "surrogates": settings.surrogates, "masks": settings.masks, "mode": settings.mode,
              "norm": a.norm, "eps": round(eps, 4), "alpha": round(alpha, 4), "iters": a.steps,
              "momentum": a.momentum, "dropout": a.dropout, "model_dropout": dict(a.model_dropout),
              "budget": a.budget, "ssim": a.ssim_target, "psnr": a.psnr_floor, "jitter": a.jitter, "seed": a.seed,
              "diversity_weight": settings.diversity_weight, "references": sorted(enrolled.mask.references),
              "images_used": enrolled.mask.meta["images_used"], "images_given": len(args.images),
              **{k: v for k, v in enrolled.info.items() if k not in ("method", "masks")},
              "threads": threads(), "load_average_1min": load_average()}
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
    p.add_argument("--mask-index", type=count_or_zero, default=0, metavar="K",
                   help="which of the file's diverse masks (0..)")
    p.add_argument("--format", default="same", choices=FORMAT_CHOICES,
                   help="output format: same as the input (GIF becomes PNG, videos H.264 mp4), png, jpg, heic, avif")
    p.add_argument("--jpeg-quality", type=number_in(1, 100, integer=True), default=DEFAULT_JPEG_QUALITY,
                   help="quality of JPEG, HEIC and AVIF outputs, 1..100 (default %(default)s)")
    p.add_argument("--keep-metadata", action="store_true", help="keep EXIF (location, camera); stripped by default")
    p.add_argument("--keep-date", action="store_true",
                   help="keep the capture date and time (EXIF, a video's creation time); location, camera and "
                        "serial numbers are still stripped")
    p.add_argument("--copy-unprotected", action="store_true", help="copy photos without the person unchanged")
    p.add_argument("--judges", default="all",
                   help="models that check every masked face on the saved photo (comma list or 'all')")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check (faster: apply is then detection, matching and paste only)")
    p.add_argument("--recursive", action="store_true")
    add_output_flags(p)
    p.add_argument("--json", metavar="REPORT", help="per-file report (.json, or .jsonl streamed; - for stdout)")
    add_report_flag(p, photos=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_apply)


def _cmd_apply(args: argparse.Namespace) -> int:
    from faceveil.pipeline.maskfile import load_mask

    mask = load_mask(args.mask)  # first: a crafted file is refused before the models' libraries are loaded

    from faceveil.api import apply_files
    from faceveil.models import zoo
    from faceveil.pipeline.person import ApplySettings
    from faceveil.report import batch_header

    check_report_targets(args)
    if not 0 <= args.mask_index < mask.count:
        raise FaceveilError(f"--mask-index {args.mask_index} is out of range: the mask file holds {mask.count} "
                            f"mask(s) (0..{mask.count - 1})")
    judges = zoo.parse_models(args.judges)
    output = {"fmt": args.format, "jpeg_quality": args.jpeg_quality, "keep_metadata": args.keep_metadata,
              "keep_date": args.keep_date, "copy_unprotected": args.copy_unprotected, "existing": args.existing,
              "drop_audio": args.drop_audio, "verify": not args.no_verify, "judges": judges}
    settings = ApplySettings(all_faces=args.all_faces, mask_index=args.mask_index, **output)
    report = apply_files(mask, args.inputs, args.output, all_faces=args.all_faces, mask_index=args.mask_index,
                         recursive=args.recursive, report_path=args.json, progress=not args.quiet,
                         header=batch_header("apply", settings), **output)
    _print_apply_table(report.results, table_stream(args))
    if not args.no_verify:
        _print_apply_checks(report.results, judges, table_stream(args))
    return finish_batch(report, "apply", args, table_stream(args))


def _print_apply_table(results, stream=None) -> None:
    lines = ["| file | status | faces | masked | skipped | verdict |", "|---|---|---|---|---|---|"]
    for r in results:
        d = r.details or {}
        found = d.get("faces_detected", d.get("tracks", ""))
        masked = d.get("masked", d.get("masked_tracks", ""))
        skipped = d.get("skipped", d.get("skipped_tracks", ""))
        status = "written" if r.status == "ok" else r.status
        said = "; ".join(x for x in (r.verdict, r.message) if x)
        lines.append(f"| {printable(Path(r.file).name)} | {status} | {found} | {masked} | {skipped} | "
                     f"{printable(said)} |")
        for other in d.get("not_faces", []):  # detections the face check refused: left alone
            lines.append(f"| {printable(Path(r.file).name)} | - | | | | {other['reason']} |")
    print("\n".join(lines), file=stream or sys.stdout)
    print("faces = detected (tracks for videos); masked = the enrolled person's; skipped = other people; verdict = "
          "what the face-recognition models say about the masked faces of the saved file",
          file=stream or sys.stdout)


def _print_apply_checks(results, judges: list[str], stream=None) -> None:
    """Per masked face, as protect prints it: each judge's similarity original -> masked on the saved file, '*'
    where it still matches; then the verdict over all masked faces (a mask that protects nothing says so)."""
    faces = [f for r in results for f in ((r.details or {}).get("faces") or []) if f.get("masked")]
    if not faces:
        return
    print_judge_table([r for r in results if any(f.get("masked") for f in (r.details or {}).get("faces") or [])],
                      judges, only=lambda face: bool(face.get("masked")), stream=stream)
    totals = {key: sum((r.details or {}).get("verdict", {}).get(key, 0) for r in results)
              for key in ("masked", "protected", "recognised_by_some", "recognised_by_all", "not_redetected")}
    print(verdict_line(totals, len(judges)), file=stream or sys.stdout)


def verdict_line(totals: dict[str, int], judges: int) -> str:
    """One line over all masked faces: how many no judge recognises any more, and how many every judge still does."""
    masked, nothing = totals["masked"], totals["recognised_by_all"]
    line = (f"masked faces: {masked}; no longer recognised by any of the {judges} judges: {totals['protected']}; "
            f"by some: {totals['recognised_by_some']}; still recognised by all: {nothing}")
    if totals["not_redetected"]:
        line += f"; not found again: {totals['not_redetected']}"
    if masked and nothing == masked:
        line += (" -- this mask protects none of these faces against these judges (enroll again with "
                 "--strength high, a visible mask, or protect these photos with `faceveil protect`)")
    return line


# ----------------------------------------------------------------------------------------------- bench


def _add_bench_apply(bench) -> None:
    p = bench.add_parser("apply", help="seconds to enroll 10 photos, to apply on a 12 MP photo, and 720p video fps")
    p.add_argument("--images", type=positive_int, default=10,
                   help="photos enrolled (LFW person if present, else samples)")
    p.add_argument("--iters", type=positive_int, default=16, help="enroll iterations (paper: 16)")
    p.add_argument("--repeats", type=positive_int, default=3, help="12 MP apply repeats (median)")
    p.add_argument("--seconds", type=number_in(0.1, 3600), default=10.0, help="length of the generated 720p clip")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench_apply)


def _cmd_bench_apply(args: argparse.Namespace) -> int:
    from faceveil.bench import apply as bench_apply

    rows, info = bench_apply.run(args.images, args.iters, args.repeats, args.seconds, progress=not args.quiet)
    settings = {"images": args.images, "iters": args.iters, "repeats": args.repeats, "seconds": args.seconds,
                "threads": threads(), "load_average_1min": load_average(), **info}
    emit("bench apply", settings, rows, args.json)
    return 0

