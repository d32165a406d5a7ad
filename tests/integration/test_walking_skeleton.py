"""The whole path through real parts: mlflow server, Lightning, FAISS, gRPC on loopback."""

from __future__ import annotations

import io

import grpc
import numpy as np
import polars as pl
import pytest
from PIL import Image

from embed.encoder import ItemEncoder
from embed.load import load_encoder
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from training.data.catalog import iter_items, read_catalog
from training.data.synthetic import load_traits
from training.fitting.config import TrainConfig
from training.fitting.train import prepare_features, recommendation_setup

from .conftest import STEPS, Trained


def _png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_info(client: Client, trained: Trained) -> None:
    assert client.health_status() == "SERVING"
    assert client.health_status("onetower.v1.Recommendations") == "SERVING"
    info = client.info()
    catalog = pl.read_parquet(trained.dataset.catalog)
    assert info.model_name == "onetower-encoder"
    assert info.model_version == trained.model_version
    assert info.model_alias == "champion"
    assert info.item_count >= catalog.height  # earlier tests may have upserted
    assert info.dim == 64
    assert info.index_kind == "flat"


def test_similar_items_by_id_never_returns_the_query(client: Client, trained: Trained) -> None:
    ids = pl.read_parquet(trained.dataset.catalog)["item_id"].head(20).to_list()
    results = client.similar(item_ids=ids, k=10)
    assert len(results) == len(ids)
    for query, neighbours in zip(ids, results, strict=True):
        assert len(neighbours) == 10
        assert query not in {n.item_id for n in neighbours}
        scores = [n.score for n in neighbours]
        assert scores == sorted(scores, reverse=True)


def test_upserted_item_is_found_at_once(client: Client) -> None:
    item = pb.Item(item_id="fresh-red-bag", title="Zorvane leather bag", description="Brand new.",
                   attributes={"category": "bag"}, images=[_png()])
    resp = client.upsert([item], neighbors_k=5)
    assert resp.upserted == 1
    assert len(resp.neighbors) == 1 and len(resp.neighbors[0].neighbors) == 5
    assert "fresh-red-bag" not in {n.item_id for n in resp.neighbors[0].neighbors}
    vector = client.embeddings(["fresh-red-bag"])["fresh-red-bag"]
    top = client.similar(vectors=[vector], k=1)[0]
    assert top[0].item_id == "fresh-red-bag"
    assert top[0].score == pytest.approx(1.0, abs=1e-4)
    found = client.similar(item_ids=["fresh-red-bag"], k=3, attributes_equal={"category": "bag"})[0]
    assert len(found) == 3


def test_embed_items_text_only_and_image_only(client: Client) -> None:
    resp = client.embed([pb.Item(title="Lumetta cotton shirt"), pb.Item(images=[_png((30, 30, 200))])])
    assert [list(e.modalities) for e in resp.embeddings] == [["text"], ["image"]]
    for e in resp.embeddings:
        vec = np.asarray(e.vector.values)
        assert vec.shape == (64,)
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-4)


def test_undecodable_image_is_invalid_argument_naming_the_field(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.embed([pb.Item(title="fine"), pb.Item(title="broken", images=[_png(), b"not an image"])])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_undecodable" in err.value.details()
    assert "items[1].images[1]" in err.value.details()
    assert client.health_status() == "SERVING"  # and it keeps serving
    assert client.info().item_count > 0


def test_neighbours_share_traits_far_more_than_chance(client: Client, trained: Trained) -> None:
    """Ground truth from the generator: neighbours should carry the query item's traits."""
    traits = load_traits(trained.dataset.root)
    sample = traits.filter(pl.col("has_image") & pl.col("has_text")).head(150)
    results = client.similar(item_ids=sample["item_id"].to_list(), k=10)
    by_id = {row["item_id"]: row for row in traits.iter_rows(named=True)}
    lifts = {}
    for trait in ("category", "colour", "brand", "material"):
        share = np.mean([by_id[n.item_id][trait] == row[trait]
                         for row, neighbours in zip(sample.iter_rows(named=True), results, strict=True)
                         for n in neighbours if n.item_id in by_id])  # not items upserted by other tests
        freq = traits[trait].value_counts(normalize=True)["proportion"].to_numpy()
        chance = float((freq ** 2).sum())  # P(a random other item shares the value)
        lifts[trait] = share / chance
    # the shared trait is in both modalities; the conjunction traits come from co-engagement
    assert lifts["category"] > 2.0, lifts
    assert np.mean(list(lifts.values())) > 1.5, lifts


TEXT_TRAITS = ("brand", "material", "price_band")  # only in the title and description
IMAGE_TRAITS = ("colour", "pattern", "shape")  # only in the picture


def _offline_lifts(encoder: ItemEncoder, trained: Trained, sample_ids: list[str]) -> dict[str, float]:
    """Per trait: P(a top-10 neighbour shares the query's value) / P(a random other item does); exact search."""
    traits = load_traits(trained.dataset.root)
    items = list(iter_items(read_catalog(trained.dataset.catalog), trained.dataset.catalog.parent))
    vectors = encoder.encode(items)
    row = {it.item_id: i for i, it in enumerate(items)}
    scores = vectors[[row[i] for i in sample_ids]] @ vectors.T  # (Q, N)
    scores[np.arange(len(sample_ids)), [row[i] for i in sample_ids]] = -np.inf  # never the query itself
    top = np.argsort(-scores, axis=1)[:, :10]
    values = {t: dict(zip(traits["item_id"], traits[t], strict=True)) for t in (*TEXT_TRAITS, *IMAGE_TRAITS)}
    lifts = {}
    for trait, of in values.items():
        share = np.mean([of[items[n].item_id] == of[q] for q, nbrs in zip(sample_ids, top, strict=True) for n in nbrs])
        freq = traits[trait].value_counts(normalize=True)["proportion"].to_numpy()
        lifts[trait] = float(share / (freq ** 2).sum())
    return lifts


def test_training_lifts_the_text_traits_above_an_untrained_twin(trained: Trained) -> None:
    """Learning is shown, not assumed: the same pipeline with the same seed, before any step, as the baseline."""
    import pytorch_lightning as lightning

    config = TrainConfig(encoder="tiny", max_steps=STEPS, batch_size=64, lr=3e-3, warmup_steps=10)  # as conftest's
    lightning.seed_everything(config.seed, workers=True)  # what train() does before it builds the model
    tokenizer, enc_config, features = prepare_features(trained.dataset.catalog, config)
    module, _ = recommendation_setup(features, trained.dataset.interactions, enc_config, config, STEPS)
    untrained = ItemEncoder(module.encoder.eval(), tokenizer)
    done = load_encoder(trained.encoder_dir)
    assert done.tokenizer.vocab_size == tokenizer.vocab_size  # the same vocabulary: only the weights differ
    traits = load_traits(trained.dataset.root)
    sample = traits.filter(pl.col("has_image") & pl.col("has_text")).head(150)["item_id"].to_list()
    before, after = _offline_lifts(untrained, trained, sample), _offline_lifts(done, trained, sample)
    print("lift untrained -> trained: " + ", ".join(f"{t} {before[t]:.2f} -> {after[t]:.2f}" for t in before))
    # measured (seed 7 data, 150 steps): brand 1.15 -> 3.10, material 1.23 -> 3.46, price_band 1.07 -> 2.07
    for trait in TEXT_TRAITS:
        assert after[trait] > 1.3 * before[trait], (trait, before, after)
    # Colour is reported, not required to rise: random patch projections already carry it (2.03 untrained)
    # and co-engagement training traded a little of it away (1.89). It must not be lost.
    assert after["colour"] > 0.8 * before["colour"], (before, after)
