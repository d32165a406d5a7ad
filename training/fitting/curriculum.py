"""The three-stage curriculum over one encoder: unimodal pretraining -> alignment -> recommendation.

Each stage is its own Lightning fit (own module, loader and checkpoints under `out_dir/stage<n>`) and
starts from the previous stage's encoder weights; the tokenizer is trained once. Stage `n` trains for
`config.steps_for(n)` steps (`config.stage_steps[n]`, else `config.max_steps`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger

from embed.config import EncoderConfig
from embed.load import save_encoder
from training.data.features import AlignmentCollator, ItemFeatures, RowDataset, UnimodalCollator, rows_with
from training.fitting.config import STAGES, TrainConfig
from training.fitting.stages import AlignmentStage, EncoderStage, UnimodalPretrainStage, init_from
from training.fitting.train import (
    TrainResult,
    build_trainer,
    compile_encoder,
    loader_workers,
    prepare_features,
    recommendation_setup,
)

logger = logging.getLogger(__name__)

STAGE_LOSS = {1: "stage1/loss", 2: "stage2/loss", 3: "train/loss"}  # what each module logs per step


def run_stages(catalog: Path, interactions: Path, out_dir: Path, config: TrainConfig,
               stages: Sequence[int] = STAGES, progress_bar: bool = False, resume: bool = False) -> TrainResult:
    """Train the requested curriculum stages in order and save the final encoder under `out_dir/encoder`.

    Args:
        stages: a strictly increasing subset of (1, 2, 3); stage 3 is `train()`'s recommendation objective.
        resume: continue each stage from its own `out_dir/stage<n>/checkpoints/last.ckpt` when present
            (a finished stage then ends at once, keeping its trained weights).

    Returns:
        The encoder directory, the MLflow run (one run for all stages; each stage's final loss is
        logged as `stage<n>/loss`, stages 1-2 also per step) and `stage<n>_loss` / `train_loss` /
        `train_seconds` metrics.

    Raises:
        ValueError: `stages` is empty, unordered or names an unknown stage.
    """
    if not stages or any(s not in STAGES for s in stages) or list(stages) != sorted(set(stages)):
        raise ValueError(f"stages={tuple(stages)} must be a non-empty increasing subset of {STAGES}")
    pl.seed_everything(config.seed, workers=True)
    started = time.perf_counter()
    tokenizer, enc_config, features = prepare_features(catalog, config)
    mlf = _StageLogger(experiment_name=config.experiment, tracking_uri=mlflow.get_tracking_uri(),
                        run_name=f"curriculum-{enc_config.width}w{enc_config.depth}d")
    mlf.log_hyperparams({f"train.{k}": v for k, v in dataclasses.asdict(config).items()}
                        | {"curriculum.stages": ",".join(map(str, stages))})
    metrics: dict[str, float] = {}
    encoder_state: dict[str, torch.Tensor] | None = None
    module: EncoderStage | None = None
    for stage in stages:
        steps = config.steps_for(stage)
        module, loader = _stage_setup(stage, features, interactions, enc_config, config, steps)
        if encoder_state is not None:
            init_from(module, encoder_state)
        if config.compile:
            compile_encoder(module.encoder)
        mlf.prefix = f"stage{stage}."
        stage_dir = out_dir / f"stage{stage}"
        trainer, throughput = build_trainer(config.replace(max_steps=steps), stage_dir, mlf, progress_bar)
        last = stage_dir / "checkpoints" / "last.ckpt"
        trainer.fit(module, loader, ckpt_path=last if resume and last.is_file() else None)
        loss = float(trainer.callback_metrics.get(STAGE_LOSS[stage], torch.tensor(float("nan"))))
        metrics[f"stage{stage}_loss"] = loss
        metrics[f"stage{stage}_items_per_s"] = throughput.items_per_s
        mlf.log_metrics({f"stage{stage}/loss": loss, f"stage{stage}/items_per_s": throughput.items_per_s},
                        step=trainer.global_step)
        logger.info("stage %d: %d steps, final loss %.4f, %.1f items/s", stage, trainer.global_step, loss,
                    throughput.items_per_s)
        encoder_state = {k: v.detach().clone() for k, v in module.encoder.state_dict().items()}
    assert module is not None  # stages is non-empty
    elapsed = time.perf_counter() - started
    encoder_dir = out_dir / "encoder"
    if trainer.is_global_zero:  # one writer of the weights under DDP
        save_encoder(encoder_dir, module.encoder, tokenizer)
    metrics |= {"train_loss": metrics[f"stage{stages[-1]}_loss"], "train_seconds": elapsed}
    mlf.log_metrics({"train_loss": metrics["train_loss"], "train_seconds": elapsed})
    return TrainResult(encoder_dir=encoder_dir, run_id=str(mlf.run_id), metrics=metrics,
                       is_global_zero=trainer.is_global_zero)


class _StageLogger(MLFlowLogger):
    """One MLflow run for every stage: each module's hyper-parameters are logged under `stage<n>.`.

    (MLflow refuses to change a logged parameter, and the stages differ in `max_steps` at least.)
    """

    prefix = ""

    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        values = vars(params) if isinstance(params, Namespace) else dict(params)
        super().log_hyperparams({f"{self.prefix}{k}": v for k, v in values.items()})


def _stage_setup(stage: int, features: ItemFeatures, interactions: Path, enc_config: EncoderConfig,
                 config: TrainConfig, steps: int) -> tuple[EncoderStage, torch.utils.data.DataLoader[Any]]:
    """The module and loader of one stage (fresh encoder weights; the caller loads the previous stage's)."""
    if stage == 3:
        return recommendation_setup(features, interactions, enc_config, config, steps)
    encoder, warmup = dataclasses.asdict(enc_config), min(config.warmup_steps, steps)
    module: EncoderStage
    if stage == 1:
        rows = rows_with(features, text=False, image=False)
        collator: UnimodalCollator | AlignmentCollator = UnimodalCollator(features)
        module = UnimodalPretrainStage(encoder, config.lr, config.weight_decay, warmup, steps,
                                       moe_aux_weight=config.moe_aux_weight)
    else:
        rows = rows_with(features, text=True, image=True)
        if len(rows) < 2:
            raise ValueError(f"stage 2 needs >= 2 items with both text and an image, got {len(rows)}")
        collator = AlignmentCollator(features)
        module = AlignmentStage(encoder, config.lr, config.weight_decay, warmup, steps, config.temperature,
                                moe_aux_weight=config.moe_aux_weight)
    loader: torch.utils.data.DataLoader[int] = torch.utils.data.DataLoader(
        RowDataset(rows), batch_size=min(config.batch_size, len(rows)), shuffle=True,
        drop_last=len(rows) > config.batch_size, collate_fn=collator, **loader_workers(config.num_workers))
    return module, loader
