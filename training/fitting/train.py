"""The training job: catalog + interactions -> tokenizer -> Lightning fit -> saved encoder (+ MLflow run)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import MLFlowLogger

from embed.config import EncoderConfig
from embed.load import save_encoder
from embed.model import Block
from embed.tokens import TextTokenizer
from training.data.catalog import iter_items, read_catalog, read_interactions, restrict_modalities
from training.data.features import ItemFeatures, PairCollator, PairDataset, co_engagement_pairs
from training.fitting.config import TrainConfig
from training.fitting.pretrained import CachedItemFeatures, prepare_pretrained
from training.fitting.stages import RecommendationStage, init_from
from training.fitting.throughput import Throughput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    encoder_dir: Path
    run_id: str
    metrics: dict[str, float]
    is_global_zero: bool = True  # False in the other processes of a DDP run: they save and register nothing


def train(catalog: Path, interactions: Path, out_dir: Path, config: TrainConfig,
          progress_bar: bool = True, feature_cache: Path | None = None) -> TrainResult:
    """Train the encoder on co-engagement and save it under `out_dir/encoder`.

    A pretrained architecture (`native_pretrained`, `stitched_twin`) starts from the installed MiniLM and
    EfficientNet-Lite0 weights and trains its fusion part on their features, extracted once per item into
    `feature_cache` (default `out_dir/feature-cache`; share it between runs over one catalog).
    Logs params and curves to the active MLflow tracking URI (experiment `config.experiment`).
    """
    pl.seed_everything(config.seed, workers=True)
    started = time.perf_counter()
    pretrained = None
    features: ItemFeatures | CachedItemFeatures
    if config.encoder_config().pretrained:
        tokenizer, enc_config, features, pretrained = prepare_pretrained(
            catalog, config, feature_cache or out_dir / "feature-cache")
    else:
        tokenizer, enc_config, features = prepare_features(catalog, config)
    module, loader = recommendation_setup(features, interactions, enc_config, config, config.max_steps)
    if pretrained is not None:
        init_from(module, pretrained.state_dict())  # the backbones' pretrained weights, the fusion's seeded init
    if config.compile:
        compile_encoder(module.encoder)
    logger.info("prepared %d items in %.1fs", len(features), time.perf_counter() - started)
    mlf = MLFlowLogger(experiment_name=config.experiment, tracking_uri=mlflow.get_tracking_uri(),
                       run_name=f"train-{enc_config.width}w{enc_config.depth}d")
    trainer, throughput = build_trainer(config, out_dir, mlf, progress_bar)
    mlf.log_hyperparams({f"train.{k}": v for k, v in dataclasses.asdict(config).items()})
    trainer.fit(module, loader)
    elapsed = time.perf_counter() - started
    encoder_dir = out_dir / "encoder"
    if trainer.is_global_zero:  # one writer of the weights under DDP
        save_encoder(encoder_dir, module.encoder, tokenizer)
    loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    metrics = {"train_loss": loss, "train_seconds": elapsed, "items_per_s": throughput.items_per_s,
               "pairs_per_second": trainer.global_step * config.batch_size * trainer.world_size / max(elapsed, 1e-9)}
    mlf.log_metrics(metrics, step=trainer.global_step)
    logger.info("trained %d steps in %.1fs, final loss %.4f", trainer.global_step, elapsed, loss)
    return TrainResult(encoder_dir=encoder_dir, run_id=str(mlf.run_id), metrics=metrics,
                       is_global_zero=trainer.is_global_zero)


def loader_workers(n: int) -> dict[str, Any]:
    """DataLoader settings for `n` worker processes: spawned (not forked from a process holding torch's
    threads) and kept alive between epochs."""
    return {"num_workers": n, "persistent_workers": n > 0, "multiprocessing_context": "spawn" if n > 0 else None}


def prepare_features(catalog: Path, config: TrainConfig) -> tuple[TextTokenizer, EncoderConfig, ItemFeatures]:
    """Read the catalog, keep `config.modalities`, train the tokenizer and featurise every item.

    Returns the tokenizer, the encoder config with the tokenizer's real vocabulary size, and the features.
    """
    enc_config = config.encoder_config()
    items = restrict_modalities(iter_items(read_catalog(catalog), catalog.parent,
                                           with_images=config.modalities != "text"), config.modalities)
    tokenizer = TextTokenizer.train((it.text for it in items), enc_config.vocab_size)
    enc_config = dataclasses.replace(enc_config, vocab_size=tokenizer.vocab_size)
    return tokenizer, enc_config, ItemFeatures(items, tokenizer, enc_config, workers=config.num_workers)


def recommendation_setup(features: ItemFeatures | CachedItemFeatures, interactions: Path, enc_config: EncoderConfig,
                         config: TrainConfig, max_steps: int
                         ) -> tuple[RecommendationStage, torch.utils.data.DataLoader[tuple[int, int]]]:
    """The stage-3 module and its loader of co-engagement pairs."""
    pairs = co_engagement_pairs(read_interactions(interactions), features.row_of, config.window, len(features))
    loader = torch.utils.data.DataLoader(
        PairDataset(pairs), batch_size=config.batch_size, shuffle=True, drop_last=len(pairs.anchors) > config.batch_size,
        collate_fn=PairCollator(features), **loader_workers(config.num_workers))
    module = RecommendationStage(
        encoder_config=dataclasses.asdict(enc_config), lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, max_steps=max_steps, temperature=config.temperature,
        log_q=pairs.log_q.tolist() if config.logq_correction else None, moe_aux_weight=config.moe_aux_weight)
    return module, loader


def compile_encoder(encoder: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (parameter names, hence checkpoints, unchanged).

    Blocks rather than the whole module, so every stage's path (`forward`, `hidden_states`) is compiled.
    """
    for module in encoder.modules():
        if isinstance(module, Block):  # the unified encoder's blocks and each stitched tower's
            module.compile()


def build_trainer(config: TrainConfig, out_dir: Path, mlf: MLFlowLogger,
                  progress_bar: bool) -> tuple[pl.Trainer, Throughput]:
    """A Trainer for `config.max_steps` steps, keeping the last checkpoint under `out_dir/checkpoints`,
    and its throughput callback (items/s)."""
    throughput = Throughput()
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True), throughput]
    if progress_bar:
        callbacks.append(RichProgressBar())
    return pl.Trainer(
        max_steps=config.max_steps, accelerator=config.accelerator, devices=config.devices,
        num_nodes=config.num_nodes, strategy=config.strategy, precision=config.precision,  # type: ignore[arg-type]
        logger=mlf, callbacks=callbacks, log_every_n_steps=config.log_every_n_steps,
        enable_progress_bar=progress_bar, default_root_dir=out_dir, enable_model_summary=False,
        max_epochs=-1), throughput


def describe_training(result: TrainResult) -> str:
    """One line for a person: final loss, time, throughput, per-stage losses, the run and where the encoder is."""
    m = result.metrics
    stages = "; ".join(f"stage {n} loss {m[f'stage{n}_loss']:.4f}" for n in (1, 2, 3) if f"stage{n}_loss" in m)
    rate = f" ({m['pairs_per_second']:.0f} pairs/s)" if "pairs_per_second" in m else ""
    rate += "".join(f"; stage {n} {m[f'stage{n}_items_per_s']:.0f} items/s" for n in (1, 2, 3)
                    if f"stage{n}_items_per_s" in m)
    rate += f"; {m['items_per_s']:.0f} items/s" if "items_per_s" in m else ""
    return (f"final loss {m['train_loss']:.4f} in {m['train_seconds']:.1f}s{rate}"
            + (f" ({stages})" if stages else "") + f"; run {result.run_id}; encoder in {result.encoder_dir}")
