"""`faceveil verify ORIGINAL PROTECTED`: does a protected photo or video (from any tool) still match its original?"""

from __future__ import annotations

import argparse
from pathlib import Path

from faceveil.cli.common import Groups, add_report_flag, dataset_root, seed_value, write_outputs

DEFAULT_FRAMES = 8  # pipeline.verify.DEFAULT_FRAMES (not imported here: the parser loads no model code)


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["root"].add_parser("verify", help="does a protected photo or video (from any tool) still match its "
                                                 "original?")
    p.add_argument("original", metavar="ORIGINAL", help="the original photo or video (or another photo of the person "
                                                        "when PROTECTED is a video)")
    p.add_argument("protected", metavar="PROTECTED", help="the protected photo or video")
    p.add_argument("--models", default="all", help="judge models: comma list or 'all'")
    p.add_argument("--dataset", default=None, metavar="lfw=PATH",
                   help="distractors: 500 LFW identities (default: the faces of the installed sample photos)")
    p.add_argument("--faces", default="all", help="original faces checked: all | largest | N")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the LFW choice and of random transforms")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, metavar="N",
                   help="videos: check N frames, the middle frame of each of N equal stretches of the video "
                        f"(default {DEFAULT_FRAMES}); with a video ORIGINAL each is compared with the same frame of it")
    p.add_argument("--transforms", default=None, metavar="LIST",
                   help="also check the protected file after these everyday changes (comma list, e.g. "
                        "jpeg75,resize0.5,blur1; 'none': the file as it is only). Default: jpeg75,resize0.5,blur1 "
                        "for photos, none for videos (each transform re-detects every frame)")
    p.add_argument("--json", metavar="OUT")
    add_report_flag(p, photos=True)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from faceveil.evaluate import verify
    from faceveil.io.results import markdown_table
    from faceveil.models import zoo

    dataset = dataset_root(args.dataset) if args.dataset else None
    rows, settings = verify.run(Path(args.original), Path(args.protected), zoo.parse_models(args.models), dataset,
                                args.faces, args.seed, frames=args.frames, transforms_checked=args.transforms)
    print(markdown_table(verify.display_rows(rows)))  # emit's table, with 4-decimal scores
    if verify.lost_faces_note(rows):
        print(verify.lost_faces_note(rows))
    print("score = similarity original -> protected (cosine; -L2 for dlib); matches = at the calibrated threshold; "
          "rank of the original in the gallery (1 = recognised first)")
    doc = {"command": "verify", "settings": settings, "rows": rows}
    if "frames" in settings:  # a video: each sampled frame in words, then the line over all of them
        doc["frames"], doc["summary"] = verify.frame_summaries(rows, settings["frames"])
        for frame in doc["frames"]:
            print(f"frame {frame['frame']}: {frame['verdict']}")
        print(doc["summary"])
    write_outputs(doc, args.json, args.report, "verify", originals=args.report_originals)
    return 0
