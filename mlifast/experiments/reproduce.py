"""`mlifast reproduce mlp`: the paper's MLP grid on MNIST and Fashion-MNIST, reduced to fit
a small machine, resumable.

Grid: {SGD, Adam} × {BN, no BN} × learning rates × data sets, one shared initialisation
per architecture (the paper's fixed seed). Each run trains, then evaluates the training
loss at `alphas` points of θ0 → θT on the first `n_eval` training examples (BN networks:
statistics recomputed at every α, as the paper), and is written to runs/<id>.json
atomically — a killed grid continues with the runs it has not finished. The table is the
paper's: per optimizer × BN × learning rate, the fraction of non-monotonic runs
(Δ_min > 1e-3) among those whose final training loss is ≤ 0.1, "0.xx (N)", and the mean
Δ_min over the non-monotonic ones.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from mlifast.analysis.mli import delta_min, weight_distance
from mlifast.datasets import Batches
from mlifast.datasets import KNOWN as KNOWN_DATASETS
from mlifast.datasets import get as get_dataset
from mlifast.engine import evaluate
from mlifast.engine.results import write_json_atomically
from mlifast.experiments.train import TrainConfig, train
from mlifast.models import mlp
from mlifast.spaces import Line


@dataclass(frozen=True)
class GridConfig:
    datasets: tuple = ("mnist", "fashion-mnist")
    optimizers: tuple = ("sgd", "adam")
    batch_norm: tuple = (False, True)
    lrs: tuple = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
    hidden: tuple = (512, 512)  # the paper: 1024 wide
    epochs: int = 2  # the paper: 10
    batch_size: int = 512
    alphas: int = 50
    n_train: Optional[int] = None  # None: all 60k
    n_eval: int = 10000  # training examples the curve is measured on (the paper: all 60k)
    eval_batch_size: int = 2000
    seed: int = 0
    loss_filter: float = 0.1
    threshold: float = 1e-3


def run_id(dataset: str, optimizer: str, batch_norm: bool, lr: float) -> str:
    return f"{dataset}-{optimizer}-{'bn' if batch_norm else 'nobn'}-lr{lr:g}"


# The settings that make a run what it is (the others pick runs or read the table).
RUN_SETTINGS = ("hidden", "epochs", "batch_size", "alphas", "n_train", "n_eval", "eval_batch_size", "seed")


def run_settings(config: GridConfig) -> dict:
    """config's RUN_SETTINGS as a run's record stores them (JSON: tuples as lists)."""
    return json.loads(json.dumps({name: getattr(config, name) for name in RUN_SETTINGS}))


def read_run(path: Path, config: GridConfig, folder_settings: Optional[dict] = None) -> dict:
    """The finished run at `path`, refused if it was made with other settings than config's
    (a record that does not say, from earlier versions: `folder_settings`, those of the
    folder's config.json)."""
    record = json.loads(path.read_text())
    settings, made_with = run_settings(config), record.get("settings", folder_settings)
    if made_with != settings:
        differ = ", ".join(f"{k}={(made_with or {}).get(k, '?')!r} there, {v!r} now" for k, v in settings.items()
                           if (made_with or {}).get(k, "?") != v)
        raise ValueError(f"mlifast: {path} was made with other settings ({differ}); "
                         f"give another output folder, or delete it to run it again")
    return record


def run_grid(config: GridConfig, out: Path, progress: bool = True) -> list[dict]:
    """Every run of the grid, trained and evaluated or read back from out/runs/."""
    unknown = [d for d in config.datasets if d.strip().lower().replace("_", "-") not in KNOWN_DATASETS]
    if unknown:  # (before anything is written)
        raise ValueError(f"mlifast: unknown data set(s) {unknown}; known: {', '.join(sorted(KNOWN_DATASETS))}")
    runs_dir = Path(out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    combos = [(d, o, bn, lr) for d in config.datasets for o in config.optimizers for bn in config.batch_norm
              for lr in config.lrs]
    config_file = Path(out) / "config.json"
    folder_settings = ({name: value for name, value in json.loads(config_file.read_text()).items()
                        if name in RUN_SETTINGS} if config_file.exists() else None)
    paths = {combo: runs_dir / f"{run_id(*combo)}.json" for combo in combos}
    finished = {combo: read_run(path, config, folder_settings) for combo, path in paths.items()
                if path.exists()}  # (refused before anything is written)
    write_json_atomically(config_file, asdict(config))
    records, data_cache = [], {}
    with tqdm(combos, disable=not progress, desc="reproduce mlp", unit="run") as bar:
        for combo in bar:
            if combo in finished:
                records.append(finished[combo])
                continue
            bar.set_postfix_str(run_id(*combo))
            if combo[0] not in data_cache:
                data_cache = {combo[0]: get_dataset(combo[0])}  # one data set in memory at a time
            record = run_one(config, data_cache[combo[0]], *combo)
            write_json_atomically(paths[combo], record)
            records.append(record)
    return records


def run_one(config: GridConfig, data, dataset: str, optimizer: str, batch_norm: bool, lr: float) -> dict:
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = mlp(hidden=config.hidden, batch_norm=batch_norm)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data.split("train")
    if config.n_train is not None:
        x, y = x[: config.n_train], y[: config.n_train]
    shuffle = torch.Generator().manual_seed(config.seed + 1)
    batches = Batches(x, y, config.batch_size, shuffle=True, generator=shuffle)
    train(model, batches, TrainConfig(optimizer, lr, config.epochs, config.seed), progress=False)
    record = {"id": run_id(dataset, optimizer, batch_norm, lr), "dataset": dataset, "optimizer": optimizer,
              "batch_norm": batch_norm, "lr": lr, "settings": run_settings(config)}
    final = model.state_dict()
    if not all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point()):
        return {**record, "diverged": True, "losses": None, "final_loss": None, "delta_min": None,
                "distance": None, "normalized_distance": None, "seconds": time.perf_counter() - start}
    eval_x, eval_y = data.train_x[: config.n_eval], data.train_y[: config.n_eval]
    eval_batches = Batches(eval_x, eval_y, config.eval_batch_size)
    res = evaluate(model, Line(init, final), eval_batches, coords=config.alphas, metrics=(),
                   bn="recompute" if batch_norm else "interpolate", progress=False)
    losses = res["loss"]
    return {**record, "diverged": False, "losses": losses.tolist(),
            "final_loss": _finite_or_none(losses[-1].item()), "delta_min": _finite_or_none(delta_min(losses)),
            "distance": weight_distance(init, final), "normalized_distance": weight_distance(init, final, normalized=True),
            "seconds": time.perf_counter() - start}


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


ROWS = (("sgd", True, "SGD-BN"), ("sgd", False, "SGD-NoBN"), ("adam", True, "Adam-BN"), ("adam", False, "Adam-NoBN"))


def included(record: dict, config: GridConfig) -> bool:
    """The paper's filter: trained to a final training loss ≤ loss_filter."""
    return record["final_loss"] is not None and record["final_loss"] <= config.loss_filter


def table(records: list[dict], config: GridConfig) -> str:
    """Markdown: rows optimizer-BN, columns learning rates, cells "fraction (N)" of
    non-monotonic runs (Δ_min > threshold) among included runs, data sets pooled; then the
    mean Δ_min over non-monotonic runs per row. A Δ_min that is not finite (stored None: a
    loss of inf or NaN inside the path, finite at its end) counts as non-monotonic and
    stays out of the mean."""
    lrs = sorted(config.lrs, reverse=True)
    lines = ["| | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | mean Δ_min (non-monotonic) |",
             "|---" * (len(lrs) + 2) + "|"]
    for optimizer, bn, label in ROWS:
        if optimizer not in config.optimizers or bn not in config.batch_norm:
            continue
        cells, bumps = [], []
        for lr in lrs:
            cell = [r for r in records if r["optimizer"] == optimizer and r["batch_norm"] == bn and r["lr"] == lr
                    and included(r, config)]
            flagged = [r["delta_min"] for r in cell if r["delta_min"] is None or r["delta_min"] > config.threshold]
            bumps += [b for b in flagged if b is not None]
            cells.append(f"{len(flagged) / len(cell):.2f} ({len(cell)})" if cell else "– (0)")
        mean = f"{sum(bumps) / len(bumps):.3g}" if bumps else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def scatter(records: list[dict], config: GridConfig, path: Path) -> None:
    """Δ_min against log10 of the normalised distance ‖θT − θ0‖/‖θ0‖, included runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for optimizer, color in (("sgd", "tab:blue"), ("adam", "tab:orange")):
        for bn, marker in ((False, "o"), (True, "^")):
            pts = [(math.log10(r["normalized_distance"]), r["delta_min"]) for r in records
                   if r["optimizer"] == optimizer and r["batch_norm"] == bn and included(r, config)
                   and r["delta_min"] is not None]  # (a non-finite Δ_min has no place on the axis)
            if pts:
                ax.scatter(*zip(*pts), c=color, marker=marker, label=f"{optimizer.upper()}{' BN' if bn else ''}")
    ax.axhline(config.threshold, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="log10 ‖θT − θ0‖ / ‖θ0‖", ylabel="Δ_min (train loss)", yscale="symlog",
           title="non-monotonicity against distance travelled")
    if ax.collections:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(records: list[dict], config: GridConfig, out: Path) -> str:
    """table.md and scatter.png in `out`; returns the table."""
    text = table(records, config)
    unfiltered = table(records, replace(config, loss_filter=math.inf))
    done = len(records)
    kept = sum(included(r, config) for r in records)
    diverged = sum(bool(r["diverged"]) for r in records)
    seconds = sum(r["seconds"] for r in records)
    (Path(out) / "table.md").write_text(
        "# MLI of MNIST / Fashion-MNIST MLPs (reduced grid)\n\n"
        f"{done} runs ({diverged} diverged), {kept} with final training loss ≤ {config.loss_filter}; "
        f"non-monotonic: Δ_min > {config.threshold}. MLP 784-{'-'.join(map(str, config.hidden))}-10, "
        f"{config.epochs} epochs, batch {config.batch_size}, {config.alphas} α, training loss on the first "
        f"{config.n_eval} training examples; {seconds / 60:.1f} min of runs.\n\n{text}\n\n"
        f"Every run that did not diverge, without the loss filter:\n\n{unfiltered}\n\n![scatter](scatter.png)\n")
    scatter(records, config, Path(out) / "scatter.png")
    return text
