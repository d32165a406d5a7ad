"""Lightning modules over one `UnifiedEncoder`, one per curriculum stage."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from embed.build import build_encoder
from embed.config import EncoderConfig
from embed.features import PretrainedFeatures
from embed.model import EncoderInput
from embed.moe import auxiliary_loss, reset_routing, routing_distance, routing_usage
from embed.pretrained import PretrainedNativeEncoder
from embed.tokens import TextTokenizer
from embed.twin import StitchedTwinEncoder


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
    """Shared plumbing: the encoder, AdamW with warm-up + cosine, and the MoE auxiliary loss and routing
    statistics (subclasses save hyper-parameters and end `training_step` with `self.with_moe(loss, size)`).
    """

    def __init__(self, encoder_config: dict[str, Any], lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int, moe_aux_weight: float = 0.01) -> None:
        super().__init__()
        if moe_aux_weight < 0:
            raise ValueError(f"moe_aux_weight={moe_aux_weight} must be >= 0")
        self.moe_aux_weight = moe_aux_weight
        self.encoder = build_encoder(EncoderConfig.from_dict(encoder_config))  # unified or stitched

    def embed(self, batch: EncoderInput | PretrainedFeatures) -> torch.Tensor:
        """Unit vectors of a batch: a collated one, or cached frozen-backbone features (pretrained encoders)."""
        if isinstance(batch, PretrainedFeatures):
            if not isinstance(self.encoder, PretrainedNativeEncoder | StitchedTwinEncoder):
                raise TypeError(f"cached pretrained features need a pretrained encoder, not {self.encoder.config.architecture}")
            return self.encoder.fuse(batch)
        return self.encoder(batch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        reset_routing(self.encoder)  # routing statistics and load-balancing losses are per step

    def with_moe(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`loss` + `moe_aux_weight` x this step's load-balancing loss, logging how tokens were routed.

        Logs `moe/aux`, `moe/routing_tv` (total-variation distance between the text and the image
        tokens' expert distributions, mean over MoE layers) and `moe/{text,image}_expert<e>` (share of
        that modality's assignments per expert, mean over layers). A dense encoder adds and logs nothing.
        """
        aux, usage = auxiliary_loss(self.encoder), routing_usage(self.encoder)
        if aux is None or usage is None:
            return loss
        self.log("moe/aux", aux, batch_size=batch_size)
        self.log("moe/routing_tv", routing_distance(usage).mean(), batch_size=batch_size)
        for kind, shares in zip(("text", "image"), usage.mean(0), strict=True):
            for e, share in enumerate(shares):
                self.log(f"moe/{kind}_expert{e}", share, batch_size=batch_size)
        return loss + self.moe_aux_weight * aux

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
                 max_steps: int, temperature: float, log_q: list[float] | None = None,
                 moe_aux_weight: float = 0.01) -> None:
        super().__init__(encoder_config, lr, weight_decay, warmup_steps, max_steps, moe_aux_weight)
        self.save_hyperparameters(ignore=["log_q"])  # one value per item: not a hyper-parameter
        self.temperature = temperature
        self.register_buffer("log_q", torch.tensor(log_q) if log_q is not None else None, persistent=False)

    def training_step(self, batch: tuple[Any, Any, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        anchors, positives, a_rows, p_rows = batch
        a, p = self.embed(anchors), self.embed(positives)
        log_q = self.log_q if isinstance(self.log_q, torch.Tensor) else None
        loss = 0.5 * (sampled_softmax_loss(a, p, p_rows, log_q, self.temperature)
                      + sampled_softmax_loss(p, a, a_rows, log_q, self.temperature))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(a_rows))
        return self.with_moe(loss, len(a_rows))


def init_from(module: EncoderStage, encoder_state_dict: dict[str, torch.Tensor]) -> EncoderStage:
    """Load a previous stage's encoder weights into `module.encoder` (strict: same config and vocabulary)."""
    module.encoder.load_state_dict(encoder_state_dict, strict=True)
    return module


class UnimodalPretrainStage(EncoderStage):
    """Stage 1: masked-token prediction on text-only sequences + masked-patch reconstruction on image-only.

    Batches are `(text_only, image_only)` encoder inputs (either may have zero rows). Masked tokens
    become [MASK] and a linear head over `hidden_states` predicts the original id (BERT, without
    the 80/10/10 split); masked patches are zeroed at the input and a linear head regresses their
    original pixels, MSE over masked patches only (a SimMIM-style objective on ViLT patches).
    """

    def __init__(self, encoder_config: dict[str, Any], lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int, token_mask_rate: float = 0.15, patch_mask_rate: float = 0.4,
                 moe_aux_weight: float = 0.01) -> None:
        super().__init__(encoder_config, lr, weight_decay, warmup_steps, max_steps, moe_aux_weight)
        self.save_hyperparameters()
        for name, rate in (("token_mask_rate", token_mask_rate), ("patch_mask_rate", patch_mask_rate)):
            if not 0.0 < rate < 1.0:
                raise ValueError(f"{name}={rate} must be in (0, 1)")
        config = self.encoder.config
        self.token_head = nn.Linear(config.width, config.vocab_size)
        self.patch_head = nn.Linear(config.width, config.patch_dim)

    def masked_token_loss(self, batch: EncoderInput) -> torch.Tensor:
        """Cross-entropy on the masked real tokens ([CLS], [SEP] and padding are never masked)."""
        ids = batch.token_ids
        real = batch.text_mask & (ids != TextTokenizer.cls_id) & (ids != TextTokenizer.sep_id)
        masked = real & (torch.rand(ids.shape, device=ids.device) < self.hparams["token_mask_rate"])
        if not masked.any():
            return self.token_head.weight.sum() * 0.0  # keeps the graph (and DDP) whole
        inputs = EncoderInput(ids.masked_fill(masked, TextTokenizer.mask_id), batch.text_mask,
                              batch.patches, batch.image_mask)
        states, _ = self.encoder.hidden_states(inputs)  # (B, T, D): text-only, so S = T
        return F.cross_entropy(self.token_head(states[masked]).float(), ids[masked])

    def masked_patch_loss(self, batch: EncoderInput) -> torch.Tensor:
        """MSE between reconstructed and original pixels of the masked patches of present images."""
        b, m, n, _ = batch.patches.shape
        present = batch.image_mask[:, :, None].expand(b, m, n)
        masked = present & (torch.rand(b, m, n, device=batch.patches.device) < self.hparams["patch_mask_rate"])
        if not masked.any():
            return self.patch_head.weight.sum() * 0.0
        inputs = EncoderInput(batch.token_ids, batch.text_mask,
                              batch.patches.masked_fill(masked[..., None], 0.0), batch.image_mask)
        states, _ = self.encoder.hidden_states(inputs)
        t = batch.token_ids.shape[1]
        patch_states = states[:, t:].reshape(b, m, n, -1)  # (B, M, N, D)
        return F.mse_loss(self.patch_head(patch_states[masked]).float(), batch.patches[masked])

    def training_step(self, batch: tuple[EncoderInput, EncoderInput], batch_idx: int) -> torch.Tensor:
        text, image = batch
        mlm = self.masked_token_loss(text) if len(text) else self.token_head.weight.sum() * 0.0
        mpr = self.masked_patch_loss(image) if len(image) else self.patch_head.weight.sum() * 0.0
        loss = mlm + mpr
        size = max(len(text), len(image))
        self.log("stage1/loss", loss, prog_bar=True, batch_size=size)
        self.log("stage1/mlm", mlm, batch_size=size)
        self.log("stage1/mpr", mpr, batch_size=size)
        return self.with_moe(loss, size)


class AlignmentStage(EncoderStage):
    """Stage 2: InfoNCE between the image-only and text-only views of the same items + image-text matching.

    Batches are `(image_only, text_only, joint, rows)` over items that have both modalities. ITM: a
    binary head on the pooled joint sequence tells the item's own image from another item's (the
    batch's images rolled by a random non-zero shift), BCE over matched and mismatched pairs.
    """

    def __init__(self, encoder_config: dict[str, Any], lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int, temperature: float, itm_weight: float = 1.0, moe_aux_weight: float = 0.01) -> None:
        super().__init__(encoder_config, lr, weight_decay, warmup_steps, max_steps, moe_aux_weight)
        self.save_hyperparameters()
        self.temperature = temperature
        self.itm_head = nn.Linear(self.encoder.head.in_features, 1)  # the pooled width (2x for per-modality pools)

    def itm_loss(self, joint: EncoderInput) -> torch.Tensor:
        """BCE of the matching head on matched (label 1) and image-shuffled (label 0) joint sequences."""
        b = len(joint)
        if b < 2:
            raise ValueError(f"image-text matching needs >= 2 items a batch to shuffle images, got {b}")
        shift = int(torch.randint(1, b, ()).item())
        perm = torch.roll(torch.arange(b, device=joint.patches.device), shift)
        mismatched = EncoderInput(joint.token_ids, joint.text_mask, joint.patches[perm], joint.image_mask[perm])
        logits = torch.cat([self.itm_logits(joint), self.itm_logits(mismatched)])
        labels = torch.cat([torch.ones(b, device=logits.device), torch.zeros(b, device=logits.device)])
        return F.binary_cross_entropy_with_logits(logits, labels)

    def itm_logits(self, batch: EncoderInput) -> torch.Tensor:
        """(B,) matching logits from the pooled joint sequence."""
        states, keep = self.encoder.hidden_states(batch)
        return self.itm_head(self.encoder.pool(states, keep, batch.token_ids.shape[1])).squeeze(-1).float()

    def training_step(self, batch: tuple[EncoderInput, EncoderInput, EncoderInput, torch.Tensor],
                      batch_idx: int) -> torch.Tensor:
        image, text, joint, rows = batch
        i, t = self.encoder(image), self.encoder(text)
        nce = 0.5 * (sampled_softmax_loss(i, t, rows, None, self.temperature)
                     + sampled_softmax_loss(t, i, rows, None, self.temperature))
        itm = self.itm_loss(joint)
        loss = nce + self.hparams["itm_weight"] * itm
        self.log("stage2/loss", loss, prog_bar=True, batch_size=len(rows))
        self.log("stage2/nce", nce, batch_size=len(rows))
        self.log("stage2/itm", itm, batch_size=len(rows))
        return self.with_moe(loss, len(rows))
