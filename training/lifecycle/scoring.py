"""The numbers promotion compares: an encoder, as it would serve, scored on one holdout.

`score_encoder` is the one function that scores both a registered version (`score_version`, which loads
the version's own registered encoder) and the refresh job's candidate and champion, with the cold-start
protocol of `training.evaluation.metrics` through `ItemEncoder` (the serving path). `record_scores` tags a
version with its numbers and the fingerprint of the split they were measured on; `promote` compares only
numbers with the same fingerprint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from mlflow import MlflowClient

from embed.items import Item
from training.data.catalog import iter_items, read_catalog, read_interactions
from training.evaluation.metrics import DEFAULT_KS, evaluate_embeddings
from training.evaluation.run import embed_catalog
from training.lifecycle.lineage import split_fingerprint, trained_items
from training.lifecycle.promote import REPORTED
from training.lifecycle.register import resolve_model, tag_evaluation

logger = logging.getLogger(__name__)

N_BOOTSTRAP = 100


@dataclass(frozen=True)
class EvalSplit:
    """User histories (`train`), held-out events (`holdout`) and the fingerprint of both with the catalog."""

    train: pl.DataFrame
    holdout: pl.DataFrame
    fingerprint: str
    description: str = ""

    @classmethod
    def of(cls, catalog_ids: Sequence[str], train: pl.DataFrame, holdout: pl.DataFrame,
           description: str = "") -> EvalSplit:
        return cls(train, holdout, split_fingerprint(catalog_ids, train, holdout), description)

    @classmethod
    def read(cls, catalog_ids: Sequence[str], train: Path, holdout: Path, description: str = "") -> EvalSplit:
        return cls.of(catalog_ids, read_interactions(train), read_interactions(holdout), description)

    def cold_items(self) -> set[str]:
        """The protocol's targets: held-out items with no event in `train`."""
        trained = set(self.train["item_id"].cast(pl.String).to_list())
        return set(self.holdout["item_id"].cast(pl.String).to_list()) - trained


def score_encoder(encoder_dir: Path, items: Sequence[Item], split: EvalSplit, seed: int = 0) -> dict[str, Any]:
    """REPORTED metrics (and n_users) of the encoder in `encoder_dir` on `split`, embedding as the service does."""
    vectors = embed_catalog(encoder_dir, items)
    result = evaluate_embeddings(vectors, [it.item_id for it in items], split.train, split.holdout, DEFAULT_KS,
                                 n_bootstrap=N_BOOTSTRAP, seed=seed)
    return {**{k: float(result[k]) for k in REPORTED}, "n_users": int(result["n_users"])}


def score_version(client: MlflowClient, model_name: str, version: str, items: Sequence[Item], split: EvalSplit,
                  cache_dir: Path, seed: int = 0) -> dict[str, Any]:
    """`score_encoder` of registered `version`'s own encoder, plus `warm_items`: how many of the split's cold
    items the version trained on (None when its registration recorded no interactions)."""
    resolved = resolve_model(f"models:/{model_name}/{version}", cache_dir)
    scores = score_encoder(resolved.directory, items, split, seed)
    seen = trained_items(client, model_name, version)
    scores["warm_items"] = None if seen is None else len(split.cold_items() & seen)
    if scores["warm_items"]:
        logger.warning("%s version %s trained on %d of the %d held-out items: its score is warm, not cold-start",
                       model_name, version, scores["warm_items"], len(split.cold_items()))
    return scores


def record_scores(client: MlflowClient, model_name: str, version: str, scores: Mapping[str, Any], split: str,
                  note: Mapping[str, Any]) -> None:
    """Tag `version` with its REPORTED `scores` and the fingerprint of the `split` they were measured on
    (what `promote` compares); `note` says where (and n_users, warm_items from `scores` join it)."""
    extra = {k: scores[k] for k in ("n_users", "warm_items") if k in scores}
    tag_evaluation(client, model_name, version, scores, REPORTED, split, {**note, **extra})


def score_registered(versions: Sequence[str], model_name: str, catalog: Path, train: Path, holdout: Path,
                     cache_dir: Path, note: Mapping[str, Any], seed: int = 0) -> tuple[EvalSplit, dict[str, Any]]:
    """Score each registered version's own encoder on one split (the catalog, `train` histories, `holdout`
    targets) and tag it with its numbers and the split's fingerprint.

    Returns:
        The split and {version: scores}.

    Raises:
        MlflowException: a version is not registered.
    """
    client = MlflowClient()
    items = list(iter_items(read_catalog(catalog), catalog.parent))
    split = EvalSplit.read([it.item_id for it in items], train, holdout, f"{holdout.name} beside {train.name}")
    out: dict[str, Any] = {}
    for version in versions:
        out[version] = score_version(client, model_name, version, items, split, cache_dir, seed)
        record_scores(client, model_name, version, out[version], split.fingerprint,
                      {**note, "held_out": split.description})
    return split, out
