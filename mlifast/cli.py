"""The `mlifast` command line (`mlifast COMMAND --help` for each command).

    mlifast demo      the main job: MLI of the MNIST MLP trained with SGD and Adam
    mlifast curve     the interpolation curve between two checkpoints of any model
    mlifast surface   the 2D slice through θ0, a second initialisation θ0′ and θT
    mlifast reproduce the paper's MLP grid (reduced), resumable
    mlifast info      which backend runs each operator
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _int_at_least(minimum: int):
    """An argparse type: an integer, at least `minimum`."""
    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    return integer


_positive_int, _at_least_two = _int_at_least(1), _int_at_least(2)


def _learning_rates(text: str) -> tuple:
    try:
        rates = tuple(float(v) for v in text.split(","))
    except ValueError:
        rates = ()
    if not rates or not all(0 < r < float("inf") for r in rates):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return rates


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
    demo.add_argument("--alphas", type=_at_least_two, default=50, help="points on each line (default: 50)")
    demo.add_argument("--epochs", type=_positive_int, default=3, help="training epochs per optimizer (default: 3)")
    demo.add_argument("--hidden", type=_hidden, default=(1024, 1024), help="hidden sizes (default: 1024,1024)")
    demo.add_argument("--n-train", type=_positive_int, default=None, help="first N training examples (default: all)")
    demo.add_argument("--n-test", type=_positive_int, default=None, help="first N test examples (default: all)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    curve = commands.add_parser("curve", help="loss and accuracy along the line between two checkpoints",
                                description="Evaluate a model at points of the line from --start to --end "
                                "(state dicts saved with torch.save) in one pass over a data set.")
    _model_and_data_arguments(curve)
    curve.add_argument("--start", type=Path, required=True, help="checkpoint at α = 0")
    curve.add_argument("--end", type=Path, required=True, help="checkpoint at α = 1")
    curve.add_argument("--alphas", type=_alpha_grid, default=50, metavar="N|a:b:n",
                       help="N points on [0, 1] or n points on [a, b], at least 2 of them in [0, 1] "
                       "(default: 50; a negative a as --alphas=-0.5:1.5:9)")
    curve.add_argument("--out", type=Path, default=Path("runs/curve"), help="output folder (default: runs/curve)")
    surface = commands.add_parser("surface", help="loss on the plane through θ0, θ0′ and θT (Figure 1)",
                                  description="Evaluate the plane through an initialisation, a second "
                                  "initialisation and the trained weights on a grid in one pass per chunk of points, "
                                  "and draw the contours with both straight segments and the projected trajectory.")
    _model_and_data_arguments(surface)
    surface.add_argument("--init", type=Path, required=True, help="θ0, the initialisation the run started from")
    surface.add_argument("--init2", type=Path, required=True, help="θ0′, another initialisation")
    surface.add_argument("--end", type=Path, required=True, help="θT, the trained weights")
    surface.add_argument("--trajectory", type=Path, nargs="*", default=(), help="checkpoints along training")
    surface.add_argument("--steps", type=_at_least_two, default=11, help="grid points per axis (default: 11)")
    surface.add_argument("--range", type=_interval, default=(-0.3, 1.3), metavar="LOW:HIGH",
                         help="grid range of both coordinates (default: -0.3:1.3)")
    surface.add_argument("--out", type=Path, default=Path("runs/surface"))
    reproduce = commands.add_parser("reproduce", help="the paper's MLP grid on MNIST and Fashion-MNIST (reduced)",
                                    description="{SGD, Adam} × {BN, no BN} × learning rates × {MNIST, "
                                    "Fashion-MNIST}: train, evaluate 50 α, tabulate the fraction of non-monotonic "
                                    "runs. Resumable: finished runs are read back from OUT/runs/.")
    reproduce.add_argument("study", choices=("mlp",), help="which study (only mlp so far)")
    reproduce.add_argument("--out", type=Path, default=Path("runs/reproduce-mlp"))
    reproduce.add_argument("--epochs", type=_positive_int, default=2, help="epochs per run (default: 2; paper: 10)")
    reproduce.add_argument("--hidden", type=_hidden, default=(512, 512), help="hidden sizes (default: 512,512)")
    reproduce.add_argument("--lrs", type=_learning_rates,
                           default=(1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001), help="comma-separated learning rates")
    reproduce.add_argument("--datasets", type=lambda t: tuple(t.split(",")), default=("mnist", "fashion-mnist"))
    reproduce.add_argument("--n-train", type=_positive_int, default=None, help="first N training examples (default: all)")
    reproduce.add_argument("--n-eval", type=_positive_int, default=10000,
                           help="training examples the curves are measured on (default: 10000)")
    reproduce.add_argument("--alphas", type=_at_least_two, default=50, help="points on each line (default: 50)")
    reproduce.add_argument("--no-progress", action="store_true")
    commands.add_parser("info", help="which backend runs each operator", description="Print mlifast.info().")
    return parser


def run_surface_command(args: argparse.Namespace) -> int:
    import mlifast
    from mlifast.experiments.surface import grid, plot_surface, project, slice_plane

    _output_folder(args.out)
    model = _load_model(args.model, args.model_args)
    init = _load_checkpoint(args.init)
    init2, end, *steps = (_matching(init, args.init, p) for p in (args.init2, args.end, *args.trajectory))
    plane, second = slice_plane(init, init2, end)
    trajectory = [project(plane, state) for state in steps]
    res = mlifast.evaluate(model.eval(), plane, _batches(args), coords=grid(*args.range, args.steps), bn=args.bn,
                           progress=not args.no_progress)
    res.meta.update(model=args.model, init=str(args.init), init2=str(args.init2), end=str(args.end),
                    data=args.data, split=args.split, second_init_coords=second, trajectory=trajectory)
    res.save(args.out / "results.json")
    plot_surface(res, second, args.out / "surface.png", trajectory=trajectory)
    best = int(res["loss"].argmin())
    print(f"{args.steps}×{args.steps} points on [{args.range[0]:g}, {args.range[1]:g}]²; θ0′ at "
          f"({second[0]:.3f}, 1); lowest loss {res['loss'][best]:.4f} at {tuple(round(v, 3) for v in res.coords[best].tolist())}")
    print(f"wrote {args.out}/results.json and surface.png")
    return 0


def run_reproduce_command(args: argparse.Namespace) -> int:
    from mlifast.experiments.reproduce import GridConfig, run_grid, write_report

    _output_folder(args.out)
    config = GridConfig(datasets=args.datasets, hidden=args.hidden, epochs=args.epochs, lrs=args.lrs,
                        n_train=args.n_train, n_eval=args.n_eval, alphas=args.alphas)
    start = time.perf_counter()
    records = run_grid(config, args.out, progress=not args.no_progress)
    print(write_report(records, config, args.out))
    print(f"\n{len(records)} runs in {time.perf_counter() - start:.0f} s; wrote {args.out}/table.md and scatter.png")
    return 0


def _model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="an importable callable returning the model, e.g. mlifast.models:mlp")
    parser.add_argument("--model-args", type=json.loads, default={}, metavar="JSON",
                        help='keyword arguments of the factory, e.g. \'{"hidden": [32, 32]}\'')
    parser.add_argument("--data", required=True, metavar="mnist|fashion-mnist|PATH",
                        help="a known data set or a folder of IDX files")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--limit", type=_positive_int, default=None, help="first N examples of the split")
    parser.add_argument("--bn", choices=("interpolate", "recompute", "batch"), default="interpolate")
    parser.add_argument("--batch-size", type=_positive_int, default=1000)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _interval(text: str) -> tuple:
    try:
        low, high = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH, got {text!r}") from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"expected LOW < HIGH, got {text!r}")
    return low, high


def _alpha_grid(text: str):
    """"N" → N (evenly spaced on [0, 1]); "a:b:n" → n points on [a, b]."""
    import torch

    try:
        if ":" not in text:
            n = int(text)
            if n < 2:
                raise ValueError
            return n
        a, b, n = text.split(":")
        if int(n) < 2 or not float(a) < float(b):
            raise ValueError
        grid = torch.linspace(float(a), float(b), int(n), dtype=torch.float64)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N >= 2 or a:b:n with a < b and n >= 2, got {text!r}") from None
    from mlifast.spaces import on_segment

    if on_segment(grid).sum() < 2:  # (Δ_min and the report are taken on the segment θ0 → θT)
        raise argparse.ArgumentTypeError(f"{text!r} puts fewer than 2 points in [0, 1]")
    return grid


def _load_model(spec: str, kwargs: dict):
    import importlib

    module_name, _, factory = spec.partition(":")
    if not factory:
        raise ValueError(f"--model must be MODULE:FACTORY, got {spec!r}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-args must be a JSON object of keyword arguments, got {kwargs!r}")
    try:
        build = getattr(importlib.import_module(module_name), factory)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot build the model {spec!r}: {error}") from None
    if not callable(build):
        raise ValueError(f"--model {spec!r} is not callable (a {type(build).__name__})")
    try:
        return build(**kwargs)
    except TypeError as error:
        raise ValueError(f"cannot build the model {spec!r} with --model-args {json.dumps(kwargs)}: {error}") from None


def _load_checkpoint(path: Path):
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 — unpickling errors of every kind: one line
        raise ValueError(f"{path} is not a checkpoint of tensors torch.load can read safely "
                         f"(save model.state_dict() with torch.save): {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__}); "
                         "save model.state_dict() with torch.save")
    others = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if others:
        nested = [key for key in others if isinstance(state[key], dict)]
        hint = f"; its state dict may be the one under {nested[0]!r}: save that alone" if nested else ""
        raise ValueError(f"{path} is not a state dict: {others[:3]} are not tensors{hint}")
    return state


def _matching(init: dict, init_path: Path, path: Path) -> dict:
    """The checkpoint at `path` in --init's floating dtypes, refused unless it has its keys
    and shapes."""
    import mlifast

    state = {k: v.to(init[k].dtype) if k in init and v.is_floating_point() and init[k].is_floating_point() else v
             for k, v in _load_checkpoint(path).items()}
    try:
        mlifast.Line(init, state)
    except ValueError as error:
        said = str(error)
        problems = said.split(":", 1)[1].rsplit("\n", 1)[0] if "\n" in said else " " + said  # (the list alone)
        raise ValueError(f"{path} does not match --init {init_path}:{problems}") from None
    return state


def _output_folder(path: Path) -> None:
    """Make the output folder before any work, so that a bad --out fails first."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {path} cannot be an output folder: {error}") from None


def _load_data(name: str):
    from mlifast import datasets

    if name.lower() in datasets.KNOWN or name.lower().replace("_", "-") in datasets.KNOWN:
        return datasets.get(name)
    if Path(name).is_dir():
        return datasets.mnist(path=name)
    raise ValueError(f"unknown data set {name!r}: use one of {sorted(datasets.KNOWN)} or a folder of IDX files")


def _batches(args: argparse.Namespace):
    from mlifast.datasets import Batches

    x, y = _load_data(args.data).split(args.split)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    return Batches(x, y, args.batch_size)


def run_curve_command(args: argparse.Namespace) -> int:
    import mlifast

    _output_folder(args.out)
    model = _load_model(args.model, args.model_args)
    line = mlifast.Line(_load_checkpoint(args.start), _load_checkpoint(args.end))
    res = mlifast.evaluate(model.eval(), line, _batches(args), coords=args.alphas, bn=args.bn,
                           progress=not args.no_progress)
    res.meta.update(model=args.model, start=str(args.start), end=str(args.end), data=args.data, split=args.split)
    res.save(args.out / "results.json")
    res.plot(args.out / "curve.png")
    summary = mlifast.mli.report(res, line.origin, line.state_at(1.0))
    print(f"{'alpha':>7} {'loss':>10} {'accuracy':>9}")
    for a, loss, acc in zip(res.alphas.tolist(), res["loss"].tolist(), res["accuracy"].tolist()):
        print(f"{a:7.3f} {loss:10.4f} {acc:9.4f}")
    on = "" if summary.n_points == len(res.alphas) else f" on the {summary.n_points} points in [0, 1]"
    print(f"\nΔ_min{on} = {summary.delta_min:.4g} ({'monotonic' if summary.is_monotonic else 'not monotonic'}), "
          f"{len(summary.bumps or ())} bump(s); wrote {args.out}/results.json and curve.png")
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from mlifast.experiments.demo import DemoConfig, comparison_rows, render_table, run_demo

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
        if args.command == "curve":
            return run_curve_command(args)
        if args.command == "reproduce":
            return run_reproduce_command(args)
        if args.command == "surface":
            return run_surface_command(args)
        import mlifast

        print(json.dumps(mlifast.info(), indent=1))
        return 0
    except (FileNotFoundError, ValueError) as error:  # bad input: one clear line
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"mlifast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
