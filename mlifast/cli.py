"""The `mlifast` command line.

    mlifast demo [--out DIR]     a small end-to-end run: train, then evaluate the line
                                 from the initialisation to the trained weights
    mlifast info                 which backend runs each operator
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _demo_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10-class problem in 32 dimensions: noisy points around fixed class centres."""
    g = torch.Generator().manual_seed(1234)
    centres = torch.randn(10, 32, generator=g) * 1.5
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return centres[y] + torch.randn(n, 32, generator=g) * 1.5, y


def demo(out: Path, alphas: int = 11) -> int:
    """Train an MLP with SGD from a saved initialisation, then evaluate train loss and
    accuracy at `alphas` points of the line θ0 → θT in one pass per chunk."""
    import mlifast

    torch.manual_seed(0)
    x_train, y_train = _demo_data(4000, seed=1)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(300):
        idx = torch.randint(0, len(y_train), (128,))
        opt.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    model.eval()

    data = [(x_train[i : i + 500], y_train[i : i + 500]) for i in range(0, len(y_train), 500)]
    line = mlifast.Line(init, model)
    start = time.perf_counter()
    res = mlifast.evaluate(model, line, data, coords=alphas, metrics=("accuracy",))
    seconds = time.perf_counter() - start

    losses = res["loss"]
    rises = (losses[1:] - torch.cummin(losses, 0).values[:-1]).clamp_min(0)
    delta_min = rises.max().item() if len(rises) else 0.0
    print(f"\nmlifast demo: MLP 32-128-128-10, {len(y_train)} examples, {alphas} points in {seconds:.2f} s")
    print(f"backend: {json.dumps(mlifast.info()['ops'])}\n")
    print(f"{'alpha':>6} {'loss':>10} {'accuracy':>9}")
    for a, loss, acc in zip(res.alphas.tolist(), losses.tolist(), res["accuracy"].tolist()):
        print(f"{a:6.2f} {loss:10.4f} {acc:9.3f}")
    print(f"\nΔ_min = {delta_min:.4g} ({'monotonic' if delta_min == 0 else 'not monotonic'})")
    res.meta["delta_min"] = delta_min
    res.save(out / "results.json")
    res.plot(out / "curves.png")
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlifast", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train a small MLP and evaluate its interpolation line")
    demo_parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo_parser.add_argument("--alphas", type=int, default=11, help="points on the line (default 11)")
    commands.add_parser("info", help="print which backend runs each operator")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.alphas < 2:
            parser.error("--alphas must be at least 2")
        return demo(args.out, args.alphas)
    import mlifast

    print(json.dumps(mlifast.info(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
