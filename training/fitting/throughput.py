"""Training throughput: item views encoded per second, logged per step and summed up per fit."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl

from embed.features import PretrainedFeatures
from embed.model import EncoderInput

logger = logging.getLogger(__name__)


def batch_items(batch: Any) -> int:
    """Item views in a batch: the rows of every `EncoderInput` in it (a stage-2 batch of B items has 3B)."""
    if isinstance(batch, EncoderInput | PretrainedFeatures):
        return len(batch)
    if isinstance(batch, list | tuple):
        return sum(batch_items(part) for part in batch)
    return 0


class Throughput(pl.Callback):
    """Logs `train/items_per_s` each step (all processes together) and its fit-long mean at the end.

    Step time runs from one batch end to the next, so data loading counts; the first step (warm-up,
    lazy initialisation) is left out of `items_per_s`, the fit-long mean.
    """

    def __init__(self) -> None:
        self.items = 0
        self.seconds = 0.0
        self._last: float | None = None

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.items, self.seconds, self._last = 0, 0.0, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            items, seconds = batch_items(batch) * trainer.world_size, now - self._last
            self.items, self.seconds = self.items + items, self.seconds + seconds
            pl_module.log("train/items_per_s", items / max(seconds, 1e-9), batch_size=1)
        self._last = now

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.seconds > 0:
            logger.info("%d steps: %.1f items/s (%d item views in %.1fs, %d processes)", trainer.global_step,
                        self.items_per_s, self.items, self.seconds, trainer.world_size)
