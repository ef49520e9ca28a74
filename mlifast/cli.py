"""The `mlifast` command line (`mlifast COMMAND --help` for each command).

    mlifast demo      the main job: MLI of the MNIST MLP trained with SGD and Adam
    mlifast info      which backend runs each operator
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _hidden(text: str) -> tuple:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden sizes are comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlifast", description="Evaluate models at many points of weight space "
                                     "in one pass; reproduce the MLI study (Lucas et al. 2021).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="MLI of the MNIST MLP trained with SGD and with Adam",
                               description="From one saved initialisation, train the paper's MNIST MLP with SGD "
                               "and with Adam, evaluate train and test loss and accuracy along both lines θ0 → θT "
                               "on the full data sets, and report the MLI measures.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    demo.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
    demo.add_argument("--alphas", type=_positive_int, default=50, help="points on each line (default: 50)")
    demo.add_argument("--epochs", type=_positive_int, default=1, help="training epochs per optimizer (default: 1)")
    demo.add_argument("--hidden", type=_hidden, default=(1024, 1024), help="hidden sizes (default: 1024,1024)")
    demo.add_argument("--n-train", type=_positive_int, default=None, help="first N training examples (default: all)")
    demo.add_argument("--n-test", type=_positive_int, default=None, help="first N test examples (default: all)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    commands.add_parser("info", help="which backend runs each operator", description="Print mlifast.info().")
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    from mlifast.experiments.demo import DemoConfig, comparison_rows, render_table, run_demo

    if args.alphas < 2:
        raise SystemExit("mlifast demo: error: --alphas must be at least 2")
    start = time.perf_counter()
    config = DemoConfig(dataset=args.dataset, hidden=args.hidden, alphas=args.alphas, epochs=args.epochs,
                        n_train=args.n_train, n_test=args.n_test, progress=not args.no_progress, out=args.out)
    result, reports, curves = run_demo(config)
    print(f"\nmlifast demo — {config.dataset}, MLP 784-{'-'.join(map(str, config.hidden))}-10, "
          f"{result['examples']['train']} train / {result['examples']['test']} test examples, {config.alphas} α per line\n")
    print(render_table(comparison_rows(reports, curves)))
    secs = result["seconds"]
    print(f"\nevaluation of {2 * config.alphas} points: train {secs['evaluate_train_s']:.1f} s, "
          f"test {secs['evaluate_test_s']:.1f} s; total {time.perf_counter() - start:.1f} s")
    print(f"wrote {config.out}/: report.md results.json curves.png init.pt sgd.pt adam.pt")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo_command(args)
        import mlifast

        print(json.dumps(mlifast.info(), indent=1))
        return 0
    except FileNotFoundError as error:  # a missing data set or checkpoint: one clear line
        print(f"mlifast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
