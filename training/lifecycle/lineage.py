"""What a registered version trained on, and fingerprints of interactions and evaluation splits.

A version registered with its training interactions carries tags (`trained_on.*`: row count, time range,
a digest of the events, the number and digest of the items) and the item ids themselves as a run
artifact (`trained_on/items.parquet`), so a later refresh can hold out items the version never saw.

Digests are sha256 over a canonical CSV (sorted rows; ts as integer microseconds when it is a datetime),
so they do not depend on row order, parquet encoding or polars' hash seeds.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import mlflow
import polars as pl
from mlflow import MlflowClient

logger = logging.getLogger(__name__)

TRAINED_ON = "trained_on."  # model-version tag prefix
ITEMS_ARTIFACT = "trained_on/items.parquet"  # in the version's run


def interactions_digest(frame: pl.DataFrame) -> str:
    """sha256 of the events (user_id, item_id, ts, weight), independent of their order."""
    ts: pl.Expr = pl.lit(None, dtype=pl.Int64)
    if "ts" in frame.columns:
        dtype = frame.schema["ts"]
        ts = pl.col("ts").dt.epoch("us") if dtype.is_temporal() else pl.col("ts").cast(pl.Float64)
    weight = pl.col("weight").cast(pl.Float64) if "weight" in frame.columns else pl.lit(1.0)
    canonical = frame.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
                             ts.alias("ts"), weight.alias("weight")).sort(["user_id", "item_id", "ts", "weight"])
    return hashlib.sha256(canonical.write_csv().encode()).hexdigest()


def items_digest(item_ids: Iterable[str]) -> str:
    """sha256 of a set of item ids (sorted, one a line)."""
    return hashlib.sha256("\n".join(sorted(set(item_ids))).encode()).hexdigest()


def split_fingerprint(catalog_ids: Iterable[str], train: pl.DataFrame, holdout: pl.DataFrame) -> str:
    """What a cold-start score depends on besides the model: the candidate items, the histories, the targets."""
    parts = (items_digest(catalog_ids), interactions_digest(train), interactions_digest(holdout))
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def trained_on_tags(frame: pl.DataFrame) -> dict[str, str]:
    """The `trained_on.*` tags of a version trained on `frame`."""
    items = frame["item_id"].cast(pl.String).unique()
    tags = {"rows": str(frame.height), "sha256": interactions_digest(frame), "items": str(items.len()),
            "items_sha256": items_digest(items.to_list())}
    if "ts" in frame.columns and frame.height:
        tags |= {"ts_min": str(frame["ts"].min()), "ts_max": str(frame["ts"].max())}
    return {TRAINED_ON + k: v for k, v in tags.items()}


def record_trained_on(client: MlflowClient, name: str, version: str, run_id: str, frame: pl.DataFrame) -> None:
    """Tag `version` with what it trained on and log its item ids to `run_id` (`trained_on/items.parquet`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(ITEMS_ARTIFACT).name
        frame.select(pl.col("item_id").cast(pl.String)).unique().sort("item_id").write_parquet(path)
        client.log_artifact(run_id, str(path), artifact_path=str(Path(ITEMS_ARTIFACT).parent))
    for key, value in trained_on_tags(frame).items():
        client.set_model_version_tag(name, version, key, value)


def trained_items(client: MlflowClient, name: str, version: str) -> set[str] | None:
    """The item ids `version` trained on, or None when its registration recorded none.

    Raises:
        ValueError: the recorded items do not match the version's `trained_on.items_sha256` tag.
    """
    mv = client.get_model_version(name, version)
    expected = mv.tags.get(TRAINED_ON + "items_sha256")
    if expected is None or not mv.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=ITEMS_ARTIFACT, dst_path=tmp,
                                                    tracking_uri=mlflow.get_tracking_uri())
        items = set(pl.read_parquet(local)["item_id"].to_list())
    if items_digest(items) != expected:
        raise ValueError(f"{name} version {version}: {ITEMS_ARTIFACT} of run {mv.run_id} does not match its "
                         f"trained_on.items_sha256 tag {expected[:12]}")
    return items
