"""Training configuration: one frozen dataclass, read from YAML by the command line."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embed.config import EncoderConfig, known_fields, preset
from training.data.catalog import MODALITIES

CONFIG_DIR = Path(__file__).parents[1] / "configs"  # the bundled YAML files: demo, tiny, gpu, eval-*, curriculum*
PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true")
STAGES = (1, 2, 3)  # unimodal pretraining, image-text alignment, recommendation fine-tuning
SECTIONS = ("trainer", "model", "data")  # LightningCLI-style YAML groups, flattened into TrainConfig fields


@dataclass(frozen=True)
class TrainConfig:
    """How the recommendation stage trains. The demo config (150 steps) trains in about two minutes on 2 CPU cores."""

    encoder: str = "demo"  # size by name: tiny, demo, small, base
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 300
    # Curriculum (`run_stages`) only: optimiser steps per stage (1 unimodal, 2 alignment, 3 recommendation);
    # a stage not listed trains for `max_steps`. `train()` ignores it.
    stage_steps: dict[int, int] = field(default_factory=dict)
    batch_size: int = 128  # in-batch negatives: larger is a harder, better objective
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    temperature: float = 0.05
    logq_correction: bool = True  # subtract log popularity of in-batch negatives (Yi et al. 2019)
    window: int = 4  # items within this many events of each other in a user's history are positives
    seed: int = 0
    modalities: str = "both"  # "text" or "image" drops the other modality from every item (unimodal baselines)
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # "bf16-mixed": bf16 autocast (GPUs; CPUs with bf16 support train too, slowly)
    compile: bool = False  # torch.compile each encoder block (GPU runs; needs a C compiler on CPU)
    moe_aux_weight: float = 0.01  # weight of the MoE load-balancing loss (Switch Transformer's 0.01)
    log_every_n_steps: int = 10
    experiment: str = "onetower"

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "window", "devices", "num_nodes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for stage, steps in self.stage_steps.items():
            if stage not in STAGES or steps <= 0:
                raise ValueError(f"stage_steps[{stage!r}]={steps} needs a stage in {list(STAGES)} and positive steps")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} must be >= 2 for in-batch negatives")
        if not 0 < self.temperature <= 1:
            raise ValueError(f"temperature={self.temperature} must be in (0, 1]")
        if self.modalities not in MODALITIES:
            raise ValueError(f"modalities={self.modalities!r} must be one of {list(MODALITIES)}")
        if self.moe_aux_weight < 0:
            raise ValueError(f"moe_aux_weight={self.moe_aux_weight} must be >= 0")
        if str(self.precision) not in PRECISIONS:  # YAML reads `precision: 32` as an int, which Lightning takes too
            raise ValueError(f"precision={self.precision!r} must be one of {list(PRECISIONS)}")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        self.encoder_config()  # validates the size name and overrides early

    def steps_for(self, stage: int) -> int:
        """Optimiser steps of curriculum `stage`: `stage_steps[stage]`, else `max_steps`."""
        return self.stage_steps.get(stage, self.max_steps)

    def encoder_config(self) -> EncoderConfig:
        return preset(self.encoder, **self.encoder_overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from flat fields, or from LightningCLI-style `trainer:` / `model:` / `data:` sections of them.

        Raises:
            ValueError: an unknown key, a field given twice, or a section that is not a mapping.
        """
        flat = {k: v for k, v in data.items() if k not in SECTIONS}
        for section in SECTIONS:
            values = data.get(section) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{section}: must be a mapping of TrainConfig fields, got {values!r}")
            twice = sorted(set(values) & set(flat))
            if twice:
                raise ValueError(f"{twice} given twice (in {section}: and elsewhere)")
            flat |= values
        return cls(**known_fields(cls, flat, "training config"))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_train_config(ref: str) -> TrainConfig:
    """Read a training YAML file, or a bundled one by name (`demo`, `tiny`, `gpu`).

    Raises:
        FileNotFoundError: `ref` is neither a file nor a bundled name.
        TypeError: the YAML is not a mapping.
        ValueError: it names unknown `TrainConfig` fields or invalid values.
    """
    path = Path(ref)
    if not path.is_file():
        bundled = CONFIG_DIR / f"{ref}.yaml"
        if not bundled.is_file():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"config {ref!r} is neither a YAML file nor a bundled config {names}")
        path = bundled
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TypeError(f"{path} must hold a mapping of TrainConfig fields, got {type(data).__name__}")
    return TrainConfig.from_dict(data)


@dataclass(frozen=True)
class Budget:
    """Training steps sized from the data: `epochs` passes over `pairs` at `batch_size`, within [floor, cap]."""

    steps: int
    pairs: int
    epochs: int
    batch_size: int
    floor: int
    cap: int

    def describe(self) -> str:
        return (f"{self.steps} steps: {self.epochs} epochs of {self.pairs} co-engagement pairs at batch "
                f"{self.batch_size}, within [{self.floor}, {self.cap}]")


def data_budget(pairs: int, batch_size: int, epochs: int = 3, floor: int = 100, cap: int = 3000) -> Budget:
    """Steps for `epochs` passes over `pairs` training pairs, at least `floor` and at most `cap`."""
    if pairs <= 0 or batch_size <= 0 or epochs <= 0 or not 0 < floor <= cap:
        raise ValueError(f"pairs={pairs}, batch_size={batch_size}, epochs={epochs} must be positive and "
                         f"0 < floor={floor} <= cap={cap}")
    steps = min(cap, max(floor, math.ceil(epochs * pairs / batch_size)))
    return Budget(steps, pairs, epochs, batch_size, floor, cap)
