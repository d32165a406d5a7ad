"""`onetower train` under Lightning DDP: two CPU processes (gloo) train one model, and rank 0 alone registers it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from embed.load import load_encoder
from training.data.catalog import iter_items, read_catalog
from training.data.synthetic import SynthConfig, generate
from training.lifecycle.register import MODEL_NAME

ONETOWER = Path(sys.executable).with_name("onetower")


@pytest.mark.slow
def test_two_process_ddp_curriculum_registers_exactly_one_version(tmp_path: Path) -> None:
    dataset = generate(tmp_path / "data", SynthConfig(n_items=120, n_users=40, seed=5, image_size=32))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(ONETOWER), "train", "--catalog", str(dataset.catalog), "--interactions", str(dataset.interactions),
           "--config", "tiny", "--max-steps", "3", "--stages", "1,2,3", "--out", str(tmp_path / "runs"),
           "--tracking-uri", uri, "--trainer.devices", "2", "--trainer.num_nodes", "1",
           "--trainer.accelerator", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # the command ran twice (Lightning relaunched it as local rank 1) and each stage's fit spanned 2 processes
    assert done.stdout.count("training the tiny encoder") == 2, done.stdout
    # one throughput line per stage, from rank 0 only (Lightning's own "Starting with 2 processes" lines don't count)
    throughput = re.findall(r"\d+ steps: [\d.]+ items/s \(\d+ item views in [\d.]+s, 2 processes\)", done.stderr)
    assert len(throughput) == 3, done.stderr[-5000:]
    assert done.stdout.count("registered onetower-encoder version 1") == 1, done.stdout
    versions = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{MODEL_NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    items = list(iter_items(read_catalog(dataset.catalog), dataset.root, with_images=True))[:4]
    vectors = load_encoder(tmp_path / "runs" / "encoder").encode(items)
    assert vectors.shape == (4, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
