"""The main job: MLI of the paper's MNIST MLP trained with SGD and with Adam.

From one saved initialisation θ0, train 784-1024-1024-10 with SGD (momentum 0.9) and
with Adam; evaluate train and test loss and accuracy at 50 α on both lines
θ0 → θ_SGD and θ0 → θ_Adam — as one plane through (θ0, θ_SGD, θ_Adam), so every batch
is read once for all 100 points; report the MLI measures of each run.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mlifast.analysis.mli import MLISummary, delta_min, summarize
from mlifast.datasets import get as get_dataset
from mlifast.engine import Results, evaluate
from mlifast.engine.results import write_json_atomically
from mlifast.experiments.train import TrainConfig, train
from mlifast.models import mlp
from mlifast.spaces import Plane

RUNS = ("sgd", "adam")


@dataclass(frozen=True)
class DemoConfig:
    dataset: str = "mnist"
    hidden: tuple = (1024, 1024)
    alphas: int = 50
    epochs: int = 3
    batch_size: int = 128
    eval_batch_size: int = 2000
    sgd_lr: float = 0.05
    adam_lr: float = 1e-3
    seed: int = 0
    n_train: Optional[int] = None  # None: the full data set
    n_test: Optional[int] = None
    progress: bool = True
    out: Path = field(default=Path("runs/demo"))


def run_demo(config: DemoConfig) -> tuple[dict, dict[str, MLISummary], dict[str, dict[str, Results]]]:
    """Train, evaluate, report; writes init.pt, sgd.pt, adam.pt, results.json, report.md
    and curves.png to config.out. Returns (the results.json dict, the MLI summary per
    run, the curves per run and split)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = {}
    data = get_dataset(config.dataset)
    if config.n_train is not None or config.n_test is not None:
        data = data.subset(config.n_train or len(data.train_x), config.n_test)

    torch.manual_seed(config.seed)
    model = mlp(hidden=config.hidden)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(init, out / "init.pt")
    trained, final_losses = {}, {}
    for name, lr in (("sgd", config.sgd_lr), ("adam", config.adam_lr)):
        start = time.perf_counter()
        model.load_state_dict(init)
        shuffle = torch.Generator().manual_seed(config.seed + 1)
        batches = data.loader("train", config.batch_size, shuffle=True, generator=shuffle)
        final_losses[name] = train(model, batches, TrainConfig(name, lr, config.epochs, config.seed),
                                   progress=config.progress, desc=f"train {name}")
        trained[name] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(trained[name], out / f"{name}.pt")
        clock[f"train_{name}_s"] = time.perf_counter() - start

    plane = Plane.through(init, trained["sgd"], trained["adam"])
    alphas = torch.linspace(0, 1, config.alphas, dtype=torch.float64)
    zeros = torch.zeros_like(alphas)
    coords = torch.cat([torch.stack([alphas, zeros], 1), torch.stack([zeros, alphas], 1)])
    curves: dict[str, dict[str, Results]] = {name: {} for name in RUNS}
    for split in ("train", "test"):
        start = time.perf_counter()
        res = evaluate(model, plane, data.loader(split, config.eval_batch_size), coords=coords,
                       progress=config.progress)
        clock[f"evaluate_{split}_s"] = time.perf_counter() - start
        for i, name in enumerate(RUNS):
            rows = slice(i * config.alphas, (i + 1) * config.alphas)
            curves[name][split] = Results(alphas[:, None], {k: v[rows] for k, v in res.values.items()},
                                          {**res.meta, "run": name, "split": split})

    reports = {name: summarize(alphas, curves[name]["train"]["loss"], init, trained[name]) for name in RUNS}
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "examples": {"train": len(data.train_y), "test": len(data.test_y)},
        "final_training_loss": final_losses,
        "seconds": clock,
        "runs": {name: {"report": reports[name].to_dict(),
                        **{split: curves[name][split].to_dict() for split in ("train", "test")}}
                 for name in RUNS},
    }
    write_json_atomically(out / "results.json", result)
    plot_demo(curves, reports, out / "curves.png")
    (out / "report.md").write_text(render_report(result, reports, curves))
    return result, reports, curves


def comparison_rows(reports: dict[str, MLISummary], curves: dict[str, dict[str, Results]]) -> list[tuple]:
    """(label, SGD value, Adam value) rows of the comparison table, as strings."""
    def both(fn):
        return tuple(fn(name) for name in RUNS)

    return [
        ("train loss at θ0 / θT", *both(lambda n: f"{reports[n].loss_start:.4f} / {reports[n].loss_end:.4f}")),
        ("test accuracy at θT", *both(lambda n: f"{curves[n]['test']['accuracy'][-1].item():.4f}")),
        ("monotonic (Δ_min = 0)", *both(lambda n: "yes" if reports[n].is_monotonic else "no")),
        ("Δ_min (train loss)", *both(lambda n: f"{reports[n].delta_min:.3g}")),
        ("Δ_min (test loss)", *both(lambda n: f"{delta_min(curves[n]['test']['loss']):.3g}")),
        ("bumps", *both(lambda n: str(len(reports[n].bumps or ())))),
        ("barrier above chord", *both(lambda n: f"{reports[n].barrier_height:.3g}")),
        ("‖θT − θ0‖", *both(lambda n: f"{reports[n].weight_distance:.2f}")),
        ("‖θT − θ0‖ / ‖θ0‖", *both(lambda n: f"{reports[n].normalized_weight_distance:.3f}")),
    ]


def render_table(rows: list[tuple]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'SGD':>17}  {'Adam':>17}"]
    lines += [f"{label:{width}}  {sgd:>17}  {adam:>17}" for label, sgd, adam in rows]
    return "\n".join(lines)


def render_report(result: dict, reports: dict, curves: dict) -> str:
    cfg, secs = result["config"], result["seconds"]
    rows = comparison_rows(reports, curves)
    table = ["| | SGD | Adam |", "|---|---|---|"] + [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    return "\n".join([
        "# mlifast demo: monotonic linear interpolation of an MNIST MLP",
        "",
        f"MLP 784-{'-'.join(map(str, cfg['hidden']))}-10 on {cfg['dataset']} "
        f"({result['examples']['train']} train / {result['examples']['test']} test examples), trained for "
        f"{cfg['epochs']} epoch(s) from one initialisation with SGD (lr {cfg['sgd_lr']}, momentum 0.9) and "
        f"Adam (lr {cfg['adam_lr']}); {cfg['alphas']} α on each line θ0 → θT, evaluated in one pass per split.",
        "",
        *table,
        "",
        f"Evaluation time: train {secs['evaluate_train_s']:.1f} s, test {secs['evaluate_test_s']:.1f} s "
        f"(both lines, {2 * cfg['alphas']} points); training {secs['train_sgd_s']:.1f} s + {secs['train_adam_s']:.1f} s.",
        "",
        "![curves](curves.png)",
        "",
    ])


def plot_demo(curves: dict, reports: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in zip(RUNS, ("tab:blue", "tab:orange")):
        for split, style in (("train", "-"), ("test", "--")):
            res = curves[name][split]
            label = f"{name.upper()} {split}"
            axes[0].plot(res.alphas, res["loss"], style, color=color,
                         label=f"{label} (Δ_min {delta_min(res['loss']):.2g})")
            axes[1].plot(res.alphas, res["accuracy"], style, color=color, label=label)
    axes[0].set(xlabel="α", ylabel="loss", yscale="log", title="cross entropy along θ0 → θT")
    axes[1].set(xlabel="α", ylabel="accuracy", title="accuracy along θ0 → θT")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
