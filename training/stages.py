"""Lightning modules over one `UnifiedEncoder`, one per curriculum stage."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from embed.config import EncoderConfig
from embed.model import EncoderInput, UnifiedEncoder


def sampled_softmax_loss(queries: torch.Tensor, keys: torch.Tensor, key_rows: torch.Tensor,
                         log_q: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """In-batch sampled softmax: query i's positive is key i; other keys are negatives.

    With `log_q` (log sampling probability of each key), logits are corrected by -log q so
    popular items are not over-penalised as negatives (Yi et al., RecSys 2019). Keys that are
    the same item as the positive are masked rather than counted as negatives.
    """
    logits = queries @ keys.T / temperature  # (B, B)
    if log_q is not None:
        logits = logits - log_q[key_rows][None, :]
    same_item = key_rows[None, :] == key_rows[:, None]
    eye = torch.eye(len(key_rows), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same_item & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(key_rows), device=logits.device))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class EncoderStage(pl.LightningModule):
    """Shared plumbing: the encoder and AdamW with warm-up + cosine (subclasses save hyper-parameters)."""

    def __init__(self, encoder_config: dict[str, Any], lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int) -> None:
        super().__init__()
        self.encoder = UnifiedEncoder(EncoderConfig.from_dict(encoder_config))

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams["lr"])
        warmup, total = self.hparams["warmup_steps"], self.hparams["max_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RecommendationStage(EncoderStage):
    """Stage 3: items co-engaged by the same user are positives; in-batch softmax with logQ correction."""

    def __init__(self, encoder_config: dict[str, Any], lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int, temperature: float, log_q: list[float] | None = None) -> None:
        super().__init__(encoder_config, lr, weight_decay, warmup_steps, max_steps)
        self.save_hyperparameters(ignore=["log_q"])  # one value per item: not a hyper-parameter
        self.temperature = temperature
        self.register_buffer("log_q", torch.tensor(log_q) if log_q is not None else None, persistent=False)

    def training_step(self, batch: tuple[EncoderInput, EncoderInput, torch.Tensor, torch.Tensor],
                      batch_idx: int) -> torch.Tensor:
        anchors, positives, a_rows, p_rows = batch
        a, p = self.encoder(anchors), self.encoder(positives)
        log_q = self.log_q if isinstance(self.log_q, torch.Tensor) else None
        loss = 0.5 * (sampled_softmax_loss(a, p, p_rows, log_q, self.temperature)
                      + sampled_softmax_loss(p, a, a_rows, log_q, self.temperature))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(a_rows))
        return loss
