"""`onetower evaluate` through typer's CliRunner on a small synthetic dataset (untrained baselines only)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from onetower.cli import app
from training.data.synthetic import SynthConfig, generate


def test_evaluate_writes_the_documented_metrics(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", SynthConfig(n_items=150, n_users=80, image_size=16, write_images=False)).root
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--data", str(data), "--out", str(out), "--models",
                                      "popularity,random", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"popularity", "random"}
    assert metrics["models"]["popularity"]["recall@20"] == 0.0  # cold items have no popularity
    lo, hi = metrics["models"]["random"]["recall@20_ci"]
    assert 0.0 <= lo <= metrics["models"]["random"]["recall@20"] <= hi <= 1.0
    assert (out / "report.md").read_text().count("random") >= 1


def test_evaluate_refuses_user_data_without_holdout(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", SynthConfig(n_items=50, n_users=20, write_images=False)).root
    result = CliRunner().invoke(app, ["evaluate", "--catalog", str(data / "catalog.parquet"),
                                      "--interactions", str(data / "interactions.parquet"),
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code != 0
    assert "--holdout-items" in result.output
