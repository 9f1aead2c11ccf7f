"""Learning-rate policies: the paper's plateau-then-cosine rule and the released code's cosine.

Paper: lr starts at 3e-4 and is divided by 2.5 whenever the moving-average training loss decreased
by less than 5e-3; once lr falls below 1e-5 (about 160 epochs) it is reset to 1e-4 and
cosine-annealed for another 100 epochs, after which training ends. The moving-average test is the
one in the authors' code: over the last `plateau_window` epoch losses since the previous change,
mean(older half) - mean(newer half) < `plateau_min_decrease`.
Released code: one cosine from lr to 0 over `epochs`.

Both are plain state machines stepped once per epoch with that epoch's mean loss; their state is a
dict of plain numbers so it can be checkpointed and restored exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stepseg.settings import TrainSettings


class LrSchedule:
    """`lr`: the rate of the next epoch; `step(loss)` after each epoch; `finished` ends training."""

    def __init__(self, settings: TrainSettings) -> None:
        self.kind = settings.schedule
        self.base_lr = settings.lr
        self.max_epochs = settings.epochs
        self.window = settings.plateau_window
        self.factor = settings.plateau_factor
        self.min_decrease = settings.plateau_min_decrease
        self.restart_below = settings.restart_below_lr
        self.restart_lr = settings.restart_lr
        self.cosine_epochs = settings.cosine_epochs
        if self.window < 2:
            raise ValueError("train.plateau_window must be at least 2 epochs")
        self.lr = self.base_lr
        self.epoch = 0
        self.losses: list[float] = []
        self.cosine_start: int | None = 0 if self.kind == "cosine" else None

    @property
    def finished(self) -> bool:
        """True once `epochs` ran or the paper's final cosine phase is complete."""
        if self.epoch >= self.max_epochs:
            return True
        return (
            self.kind == "plateau_cosine"
            and self.cosine_start is not None
            and self.epoch - self.cosine_start >= self.cosine_epochs
        )

    def step(self, epoch_loss: float) -> float:
        """Record one finished epoch and return the lr for the next one."""
        self.epoch += 1
        if self.kind == "cosine":
            self.lr = _cosine(self.base_lr, self.epoch, self.max_epochs)
        elif self.cosine_start is not None:
            self.lr = _cosine(self.restart_lr, self.epoch - self.cosine_start, self.cosine_epochs)
        else:
            self._plateau(epoch_loss)
        return self.lr

    def _plateau(self, epoch_loss: float) -> None:
        self.losses.append(float(epoch_loss))
        if len(self.losses) < self.window:
            return
        recent = self.losses[-self.window :]
        half = self.window // 2
        older, newer = recent[:half], recent[half:]
        if sum(older) / len(older) - sum(newer) / len(newer) < self.min_decrease:
            self.lr /= self.factor
            self.losses = []
        if self.lr < self.restart_below:
            self.cosine_start = self.epoch
            self.lr = self.restart_lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "epoch": self.epoch,
            "losses": list(self.losses),
            "cosine_start": -1 if self.cosine_start is None else self.cosine_start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lr = float(state["lr"])
        self.epoch = int(state["epoch"])
        self.losses = [float(v) for v in state["losses"]]
        start = int(state["cosine_start"])
        self.cosine_start = None if start < 0 else start


def _cosine(lr: float, step: int, total: int) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
