"""`onetower refresh` for real: Lightning fine-tune, MLflow server registry, reindex, promotion rule, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from embed.load import load_encoder
from index.config import IndexConfig
from index.publish import find_version_for_model, load_version, read_current
from onetower.cli import app
from training.data.catalog import read_interactions
from training.lifecycle.refresh import STATE_FILE, STEPS
from training.lifecycle.register import SPLIT_TAG, ensure_experiment, metric_tag, register_encoder
from training.reindex.job import reindex

from .conftest import N_ITEMS, Trained

MODEL = "onetower-refresh-test"  # its own registered model: the session champion stays untouched


def test_refresh_registers_reindexes_promotes_by_rule_and_resumes(trained: Trained, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(trained.tracking_uri)
    registry = MlflowClient(trained.tracking_uri)
    run = registry.create_run(ensure_experiment("onetower-tests"))
    champion = register_encoder(trained.encoder_dir, run.info.run_id, {"train_loss": 1.0}, model_name=MODEL,
                                trained_on=read_interactions(trained.dataset.interactions))
    index_root = tmp_path / "index"
    ds = trained.dataset
    reindex(ds.catalog, load_encoder(trained.encoder_dir), MODEL, champion, index_root, IndexConfig(kind="flat"))
    champion_index = read_current(index_root)
    args = ["refresh", "--catalog", str(ds.catalog), "--interactions", str(ds.interactions),
            "--holdout", str(ds.holdout_interactions), "--index-root", str(index_root), "--config", "tiny",
            "--max-steps", "8", "--model-name", MODEL, "--tracking-uri", trained.tracking_uri,
            "--workdir", str(tmp_path / "work")]
    runner = CliRunner()

    # a dry run fine-tunes and evaluates only: nothing registered, published or promoted
    started = time.perf_counter()
    dry = runner.invoke(app, [*args, "--dry-run"])
    dry_seconds = time.perf_counter() - started
    assert dry.exit_code == 0, dry.output
    assert "(dry run)" in dry.output and "recall@20" in dry.output
    assert len(registry.search_model_versions(f"name='{MODEL}'")) == 1
    assert read_current(index_root) == champion_index

    # the full run resumes from the dry run's recorded steps, as a rerun after a crash would
    started = time.perf_counter()
    first = runner.invoke(app, args)
    seconds = time.perf_counter() - started
    assert first.exit_code == 0, first.output
    assert first.output.count("done before, skipped") == 4  # champion, split, train, evaluate
    print(f"\nrefresh: dry run {dry_seconds:.1f}s, then the rest {seconds:.1f}s\n{first.output}")

    state = json.loads((tmp_path / "work" / STATE_FILE).read_text())
    steps = state["steps"]
    assert list(steps) == list(STEPS)
    assert steps["champion"]["version"] == champion
    assert steps["train"]["steps"] == 8
    candidate = steps["register"]["version"]
    assert int(candidate) == int(champion) + 1
    # both versions carry their score on the same split; the candidate is not served before promotion
    before, after = steps["evaluate"]["champion"]["recall@20"], steps["evaluate"]["candidate"]["recall@20"]
    assert steps["evaluate"]["n_users"] > 0
    for version, value in ((champion, before), (candidate, after)):
        tags = registry.get_model_version(MODEL, version).tags
        assert float(tags[metric_tag("recall@20")]) == pytest.approx(value, abs=1e-5)
        assert tags[SPLIT_TAG] == steps["split"]["fingerprint"]
    # the synthetic holdout's cold items were never in the champion's training interactions: nothing dropped
    assert steps["split"]["fair"] and "dropped" not in steps["split"]["held_out"]
    # the candidate's index is published and verifies, with every catalog item
    index_version = find_version_for_model(index_root, candidate)
    assert index_version == steps["reindex"]["index_version"]
    assert load_version(index_root, index_version).manifest.count == N_ITEMS
    # promoted exactly when promote()'s rule holds (at least the champion's recall@20)
    promoted = steps["promote"]["promoted"]
    assert promoted == (round(after, 6) >= round(before, 6)), steps["promote"]
    served = registry.get_model_version_by_alias(MODEL, "champion").version
    assert served == (candidate if promoted else champion)
    assert read_current(index_root) == (index_version if promoted else champion_index)
    for token in (f"{MODEL}@champion", "recall@20", "items reindexed", str(N_ITEMS),
                  "promoted" if promoted else "not promoted"):
        assert token in first.output

    # a rerun is a no-op resume: every step skipped, nothing registered or published
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert second.output.count("done before, skipped") == len(STEPS)
    assert json.loads((tmp_path / "work" / STATE_FILE).read_text()) == state
    assert len(registry.search_model_versions(f"name='{MODEL}'")) == 2
    assert find_version_for_model(index_root, candidate) == index_version
    if promoted:
        return
    # refused: a rerun with --force runs only the promotion again, and promotes
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert forced.output.count("done before, skipped") == len(STEPS) - 1
    assert registry.get_model_version_by_alias(MODEL, "champion").version == candidate
    assert read_current(index_root) == index_version
    assert "forced" in forced.output
