"""Training throughput and loss curves of the three-stage curriculum, dense and with modality-aware experts.

Items/s counts item views (every `EncoderInput` row: a stage-1 step of batch B has 2B, stage 2 3B,
stage 3 2B) per second of step time, data loading included, first step left out. Losses are the
first and last values logged (every 5 steps, so "first" is after 5 steps). On a GPU the `small`
size runs too, with bf16 autocast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from training.data.synthetic import SynthConfig, SynthDataset, generate
from training.fitting.config import TrainConfig
from training.fitting.curriculum import run_stages

from .conftest import QUICK, write_result

pytestmark = pytest.mark.benchmark

STEPS = 20 if QUICK else 60
STEP_LOSS = {1: "stage1/loss", 2: "stage2/loss", 3: "train/loss"}


def _curriculum(dataset: SynthDataset, uri: str, name: str, config: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    result = run_stages(dataset.catalog, dataset.interactions, dataset.root.parent / name, config)
    row: dict[str, Any] = {"variant": name, "steps_per_stage": STEPS, "seconds": time.perf_counter() - started}
    client = MlflowClient(tracking_uri=uri)
    for stage, key in STEP_LOSS.items():
        values = [m.value for m in sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.timestamp)]
        values = values[:-1] if stage < 3 else values  # stages 1-2 re-log their final loss once more at the end
        row[f"stage{stage}_loss_first"], row[f"stage{stage}_loss_last"] = values[0], values[-1]
        row[f"stage{stage}_items_per_s"] = result.metrics[f"stage{stage}_items_per_s"]
    tv = client.get_metric_history(result.run_id, "moe/routing_tv")
    row["routing_tv_last"] = tv[-1].value if tv else float("nan")
    return row


def test_curriculum_throughput_and_losses(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", threads)))
    base = TrainConfig(encoder="tiny", batch_size=32, lr=3e-3, warmup_steps=5, max_steps=STEPS, log_every_n_steps=5,
                       accelerator="cpu", experiment="bench-training")
    variants = {"tiny-cpu": base, "tiny-cpu-moe4": base.replace(encoder_overrides={"moe_experts": 4, "moe_every": 2})}
    if torch.cuda.is_available():
        gpu = base.replace(encoder="small", accelerator="gpu", precision="bf16-mixed", batch_size=256)
        variants |= {"small-gpu-bf16": gpu,
                     "small-gpu-bf16-moe4": gpu.replace(encoder_overrides={"moe_experts": 4, "moe_every": 2})}
    try:
        dataset = generate(tmp_path / "data", SynthConfig(n_items=400, n_users=300, seed=7, image_size=32))
        rows = [_curriculum(dataset, uri, name, config) for name, config in variants.items()]
    finally:
        mlflow.set_tracking_uri(before)
        torch.set_num_threads(threads)
    write_result("training", rows, notes=f"load average at the end: {os.getloadavg()}")
