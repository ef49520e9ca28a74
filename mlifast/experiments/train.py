"""A plain supervised training loop for the study's classifiers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """optimizer "sgd" (momentum 0.9, as the paper) or "adam" (betas 0.9, 0.999); lr;
    epochs over the training batches; seed of the shuffling."""

    optimizer: str = "sgd"
    lr: float = 0.1
    epochs: int = 1
    seed: int = 0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr <= 0 or self.epochs < 1:
            raise ValueError(f"lr must be > 0 and epochs >= 1, got lr={self.lr}, epochs={self.epochs}")


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def train(model: nn.Module, batches: Iterable, config: TrainConfig, *, progress: bool = True,
          desc: Optional[str] = None) -> float:
    """Train `model` in place with cross entropy; returns the mean loss of the last epoch
    (NaN if training diverged). `batches` is re-iterable (shuffled by its own generator)."""
    optimizer = make_optimizer(model, config)
    model.train()
    torch.manual_seed(config.seed)
    last = float("nan")
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        bar = tqdm(batches, disable=not progress, desc=f"{desc or config.optimizer} epoch {epoch + 1}/{config.epochs}",
                   unit="batch", leave=False)
        for x, y in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        last = total / max(count, 1)
        if last != last:  # diverged: stop early, the run is reported as such
            break
    model.eval()
    return last
