"""`faceveil` sub-commands of APF: `train apf` (the server networks) and `eval verification-asr --protocol
apf` (apf-mm2020 §4: ASR of Eq. 11 on LFW positive pairs, Tables 2-4, SSIM of Fig. 4)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from faceveil.cli.common import (
    Groups,
    add_report_flag,
    comma_list,
    dataset_root,
    positive,
    positive_int,
    seed_value,
    write_outputs,
)
from faceveil.errors import FaceveilError


def _client_config(args: argparse.Namespace, algorithm: str | None = None):
    from faceveil.methods.apf.probe import ApfClientConfig

    return ApfClientConfig(algorithm=algorithm or args.algorithm, eps=args.eps / 255, step=args.step / 255,
                           iterations=args.iterations, seed=args.seed, probe=args.probe).validate()


def _cmd_train_apf(args: argparse.Namespace) -> int:
    from faceveil.io.results import markdown_table, write_json_atomic
    from faceveil.methods.apf.train import TrainSettings, train
    from faceveil.models import zoo

    root = dataset_root(args.dataset)
    weights = [float(w) for w in comma_list(args.server_weights)] if args.server_weights else None
    settings = TrainSettings(server_models=zoo.parse_models(args.server_models), server_weights=weights,
                             images=args.images, epochs=args.epochs, transfer_epochs=args.transfer_epochs,
                             universal_epochs=args.universal_epochs, universal_steps=args.universal_steps,
                             batch=args.batch, lr=args.lr, seed=args.seed, client=_client_config(args))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = train(root, out, settings, resume=args.resume, progress=not args.quiet)
    rows = [{"phase": phase, "epochs": summary["epochs"][phase],
             "first": (summary["history"][phase] or [None])[0], "last": (summary["history"][phase] or [None])[-1]}
            for phase in summary["history"]]
    print(markdown_table(rows))
    print(f"Eq. 4 loss {summary['loss_before']['transfer']:.4f} -> {summary['loss_after']['transfer']:.4f}, "
          f"Eq. 9 loss {summary['loss_before']['joint']:.4f} -> {summary['loss_after']['joint']:.4f}; "
          f"{summary['images']} faces, {summary['seconds']:.0f} s; model {out}, log {out}.log.jsonl",
          file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, {"command": "train apf", "settings": settings.as_dict(), "rows": rows,
                                      "summary": summary})
    return 0


def _cmd_eval_verification_asr(args: argparse.Namespace) -> int:
    from faceveil.evaluate.protocols import apf as apf_protocol
    from faceveil.methods.apf.networks import default_checkpoint, load_server_model
    from faceveil.methods.apf.probe import GRADIENT_ALGORITHMS, STAGES
    from faceveil.models import zoo

    root = dataset_root(args.dataset)
    algorithms = comma_list(args.algorithms) if args.algorithms != "all" else list(GRADIENT_ALGORITHMS)
    unknown = [a for a in algorithms if a not in GRADIENT_ALGORITHMS]
    if unknown or not algorithms:
        raise FaceveilError(f"--algorithms takes a comma list of {', '.join(GRADIENT_ALGORITHMS)} (or all)")
    stages = comma_list(args.stages)
    if not stages or any(s not in STAGES for s in stages):
        raise FaceveilError(f"--stages takes a comma list of {', '.join(STAGES)}")
    server = load_server_model(args.checkpoint)
    options = apf_protocol.Options(
        algorithms=algorithms, stages=stages, judges=zoo.parse_models(args.judges), limit=args.limit,
        baseline=not args.no_baseline, adversarial=not args.no_adversarial, adversarial_limit=args.adversarial_limit,
        batch=args.batch, seed=args.seed, iterations=args.iterations, progress=not args.quiet)
    rows, settings = apf_protocol.run(root, server, options)
    settings["checkpoint"] = str(args.checkpoint or default_checkpoint())
    _print_asr_tables(rows)
    write_outputs({"command": "eval verification-asr", "settings": settings, "rows": rows}, args.json, args.report)
    return 0


def _print_asr_tables(rows: list[dict]) -> None:
    """Table 2/3 (and Table 4 when run): one line per algorithm and stage, a column per judge."""
    from faceveil.evaluate.protocols.apf import pivot
    from faceveil.io.results import markdown_table

    asr_rows = [r for r in rows if r["table"] == "asr"]
    t4_rows = [r for r in rows if r["table"] == "adversarial-matching"]
    print("ASR (Eq. 11) per judge [white = server model, probe = client's probe, family = their family, "
          "black = black-box family]")
    print(markdown_table(pivot(asr_rows, [])))
    if t4_rows:
        print("\nAdversarial-original / adversarial-adversarial matching (Table 4)")
        print(markdown_table(pivot(t4_rows, ["offset", "matching"])))


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eps", type=positive, default=8.0, help="L-inf budget, 0..255 units (paper: 8)")
    p.add_argument("--step", type=positive, default=2.0, help="step of the iterative algorithms, 0..255 (paper: 2)")
    p.add_argument("--iterations", type=positive_int, default=30, help="iterations of the algorithms (paper: 30)")
    p.add_argument("--probe", default="mobileface", help="the client's probe model")


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["train"].add_parser("apf", help="train the APF server networks (T, u, E) on LFW identities outside "
                                               "pairs.txt")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--server-models", default="faceres,dlib", help="the server's white-box models (comma list)")
    p.add_argument("--server-weights", default=None, help="ensemble weights alpha_k (comma list; default even)")
    p.add_argument("--images", type=positive_int, default=160, help="training faces")
    p.add_argument("--epochs", type=positive_int, default=5, help="joint T+E epochs (Eq. 9)")
    p.add_argument("--transfer-epochs", type=positive_int, default=20, help="T-only epochs on the cached pairs (Eq. 4)")
    p.add_argument("--universal-epochs", type=positive_int, default=2, help="passes over the faces learning u (Eq. 7)")
    p.add_argument("--universal-steps", type=positive_int, default=5, help="iterations per minibatch and pass for u")
    p.add_argument("--algorithm", default="m-di2-fgsm", help="gradient algorithm of g and g~")
    _add_client_flags(p)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--lr", type=positive, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT.pt.resume.pt")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--json", metavar="OUT", help="training summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train_apf)

    p = groups["eval"].add_parser("verification-asr", help="attack success rate on LFW positive pairs "
                                                           "(APF: Eq. 11, Tables 2-4, SSIM)")
    p.add_argument("--protocol", default="apf", choices=["apf"])
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--algorithms", default="all", help="comma list of gradient algorithms, or all")
    p.add_argument("--stages", default="g,g_hat,s", help="APF stages: g, g_hat, s")
    p.add_argument("--judges", default="all", help="comma list or all")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only N positive pairs (default 3000)")
    p.add_argument("--checkpoint", default=None, help="server model (default: the packaged one)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip 'original image accessible' (server models attack the image: the slow part)")
    p.add_argument("--no-adversarial", action="store_true", help="skip adversarial-adversarial matching (Table 4)")
    p.add_argument("--adversarial-limit", type=positive_int, default=None, metavar="N",
                   help="pairs for Table 4 (default: as --limit)")
    p.add_argument("--iterations", type=positive_int, default=30, help="iterations of the algorithms (paper: 30)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seed", type=seed_value, default=0)
    add_report_flag(p)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval_verification_asr)
