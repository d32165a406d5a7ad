"""The batch reindex: resume after a crash, incremental reuse, live-log folding, skips, pruning (real FAISS)."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from embed.config import preset
from embed.encoder import ItemEncoder
from embed.items import Item
from embed.load import load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from index.config import IndexConfig
from index.live import LiveIndex
from index.log import LOG_FILE, LogRecord, WriteLog
from index.publish import PublishedIndex, list_versions, load_version, read_current
from training.data.catalog import iter_items, read_catalog
from training.reindex import job as reindex_module
from training.reindex.job import ReindexResult, default_work_dir, reindex

N_ITEMS = 40
BROKEN = {"item-011", "item-027"}  # their image files are not images
VERSION = "1"
FLAT = IndexConfig(kind="flat", use_gpu=False)
WORDS = ["red", "blue", "leather", "cotton", "bag", "shirt", "lamp", "mug", "Zorvane", "Lumetta", "wool", "green"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny batches: extra threads only wait on each other on a shared CPU."""
    before_torch, before_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before_torch)
    faiss.omp_set_num_threads(before_faiss)


def png(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def rows(n: int, seed: int = 0, start: int = 0) -> list[dict[str, object]]:
    """Catalog rows item-<start>..; images are written later by `write_catalog`."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, object]] = []
    for i in range(start, start + n):
        out.append({"item_id": f"item-{i:03d}", "title": " ".join(rng.choice(WORDS, 3)),
                    "description": "" if i % 4 else f"a {rng.choice(WORDS)} thing",
                    "attributes": json.dumps({"category": ["bag", "shirt", "lamp"][i % 3]}),
                    "colour": [int(c) for c in rng.integers(0, 255, 3)] if i % 5 else None})
    return out


def write_catalog(folder: Path, catalog_rows: list[dict[str, object]]) -> Path:
    """A catalog parquet with image files beside it (broken ones for the ids in BROKEN)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    table = []
    for row in catalog_rows:
        colour = row["colour"]
        paths: list[str] = []
        if colour is not None:
            path = folder / "images" / f"{row['item_id']}-{'-'.join(map(str, colour))}.png"  # type: ignore[call-overload]
            path.write_bytes(b"not an image at all" if row["item_id"] in BROKEN else png(tuple(colour)))  # type: ignore[arg-type]
            paths = [str(path.relative_to(folder))]
        table.append({k: v for k, v in row.items() if k != "colour"} | {"image_paths": paths})
    pl.DataFrame(table, schema_overrides={"image_paths": pl.List(pl.String)}).write_parquet(folder / "catalog.parquet")
    return folder / "catalog.parquet"


def save_tiny_encoder(directory: Path, seed: int) -> Path:
    """An untrained tiny encoder: real weights and tokenizer, no training."""
    torch.manual_seed(seed)
    texts = [" ".join(str(r[k]) for k in ("title", "description")) for r in rows(N_ITEMS + 20)]
    tokenizer = TextTokenizer.train(texts, 200, min_frequency=1)
    return save_encoder(directory, UnifiedEncoder(preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer)


class Crash(Exception):
    """The job dying half-way (raised from its progress callback)."""


@dataclass(frozen=True)
class Base:
    catalog: Path
    encoder_dir: Path
    encoder: ItemEncoder
    root: Path  # a reindex of `catalog` (never modified: tests copy it)
    result: ReindexResult


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    folder = tmp_path_factory.mktemp("reindex")
    catalog = write_catalog(folder / "data", rows(N_ITEMS))
    encoder_dir = save_tiny_encoder(folder / "encoder", seed=0)
    encoder = load_encoder(encoder_dir, batch_size=4)
    result = reindex(catalog, encoder, "tiny", VERSION, folder / "index", FLAT, shard_size=8)
    return Base(catalog, encoder_dir, encoder, folder / "index", result)


def copy_root(base: Base, tmp_path: Path) -> Path:
    shutil.copytree(base.root, tmp_path / "index")
    return tmp_path / "index"


def vectors_by_id(published: PublishedIndex) -> dict[str, np.ndarray]:
    return {item_id: np.array(published.vectors[i]) for i, item_id in enumerate(published.ids.item_ids)}


def catalog_items(catalog: Path) -> dict[str, Item]:
    return {it.item_id: it for it in iter_items(read_catalog(catalog), catalog.parent)}


def test_undecodable_images_are_skipped_and_counted(base: Base) -> None:
    published = load_version(base.root)
    assert (base.result.count, base.result.embedded, base.result.skipped) == (N_ITEMS - 2, N_ITEMS - 2, 2)
    assert set(published.ids.item_ids) == {f"item-{i:03d}" for i in range(N_ITEMS)} - BROKEN
    assert not (base.root / ".reindex").exists()  # the work folder goes once the index is published
    items = catalog_items(base.catalog)
    expected = base.encoder.encode([items[i] for i in published.ids.item_ids[:4]])
    np.testing.assert_allclose(published.vectors[:4], expected, atol=1e-5)
    assert published.ids.content_hashes[0] == items[published.ids.item_ids[0]].content_hash()


def test_a_rerun_after_a_crash_resumes_and_gives_the_same_vectors(base: Base, tmp_path: Path) -> None:
    root = tmp_path / "index"
    calls = []

    def crash_on_fifth(n: int) -> None:  # batches of 4, shards of 8: two shards are on disk at call 5
        calls.append(n)
        if len(calls) == 5:
            raise Crash("killed")

    with pytest.raises(Crash):
        reindex(base.catalog, base.encoder, "tiny", VERSION, root, FLAT, crash_on_fifth, shard_size=8)
    assert read_current(root) is None
    assert len(list(default_work_dir(root, VERSION).glob("shard-*.parquet"))) == 2
    done: list[int] = []
    result = reindex(base.catalog, base.encoder, "tiny", VERSION, root, FLAT, done.append, shard_size=8)
    # the two shards hold items 0-15, item-011 among them refused (and counted again, not retried)
    assert (result.resumed, result.embedded, result.skipped, result.count) == (15, N_ITEMS - 16 - 1, 2, N_ITEMS - 2)
    assert sum(done) == N_ITEMS
    resumed, whole = load_version(root), load_version(base.root)
    assert resumed.ids.item_ids == whole.ids.item_ids
    np.testing.assert_array_equal(resumed.vectors, whole.vectors)  # bitwise: same batches as an uninterrupted run
    assert not default_work_dir(root, VERSION).exists()


def test_shards_of_another_model_version_are_not_resumed(base: Base, tmp_path: Path) -> None:
    work = tmp_path / "work"

    def crash(n: int) -> None:
        raise Crash

    with pytest.raises(Crash):
        reindex(base.catalog, base.encoder, "tiny", "other", tmp_path / "index", FLAT, crash, work_dir=work,
                shard_size=4)
    result = reindex(base.catalog, base.encoder, "tiny", VERSION, tmp_path / "index", FLAT, work_dir=work)
    assert (result.resumed, result.embedded) == (0, N_ITEMS - 2)


def test_incremental_reembeds_only_new_and_changed_items_and_drops_deleted_ones(base: Base, tmp_path: Path) -> None:
    root = copy_root(base, tmp_path)
    before = vectors_by_id(load_version(root))
    changed = rows(N_ITEMS)
    changed[1]["title"] = "a brand new title"
    changed[2]["attributes"] = json.dumps({"category": "mug"})
    changed[3]["colour"] = [1, 2, 3]  # a new image
    changed[6]["description"] = "now with a description"
    deleted = {changed[7]["item_id"], changed[8]["item_id"]}
    changed = [r for r in changed if r["item_id"] not in deleted] + rows(3, seed=9, start=100)
    catalog = write_catalog(tmp_path / "data2", changed)

    result = reindex(catalog, base.encoder, "tiny", VERSION, root, FLAT, incremental=True)

    new_or_changed = {"item-001", "item-002", "item-003", "item-006", "item-100", "item-101", "item-102"}
    assert (result.embedded, result.reused, result.dropped, result.skipped) == (7, N_ITEMS - 2 - 2 - 4, 2, 2)
    published = load_version(root)
    after = vectors_by_id(published)
    assert set(after) == (set(before) - deleted) | new_or_changed
    for item_id in set(after) - new_or_changed:
        np.testing.assert_array_equal(after[item_id], before[item_id])
    items = catalog_items(catalog)
    fresh = base.encoder.encode([items[i] for i in sorted(new_or_changed)])
    np.testing.assert_allclose(np.stack([after[i] for i in sorted(new_or_changed)]), fresh, atol=1e-5)
    assert published.ids.attributes[published.ids.label("item-002")] == {"category": "mug"}  # type: ignore[index]

    rebuilt = reindex(catalog, base.encoder, "tiny", "2", root, FLAT, incremental=True)  # another model version
    assert (rebuilt.reused, rebuilt.embedded) == (0, result.count)


def test_incremental_does_not_reuse_vectors_of_other_weights_under_the_same_version(base: Base,
                                                                                    tmp_path: Path) -> None:
    root = copy_root(base, tmp_path)
    retrained = load_encoder(save_tiny_encoder(tmp_path / "encoder", seed=1), batch_size=4)
    result = reindex(base.catalog, retrained, "tiny", VERSION, root, FLAT, incremental=True)
    assert (result.reused, result.embedded) == (0, N_ITEMS - 2)
    first = load_version(root).ids.item_ids[0]
    np.testing.assert_allclose(vectors_by_id(load_version(root))[first],
                               retrained.encode([catalog_items(base.catalog)[first]])[0], atol=1e-5)


def upsert(encoder: ItemEncoder, item: Item, model_version: str) -> LogRecord:
    vector = encoder.encode([item])[0] if model_version == VERSION else np.full(encoder.dim, 0.125, np.float32)
    return LogRecord(op="upsert", item_id=item.item_id, model_version=model_version, vector=vector,
                     content=item.to_content(), content_hash=item.content_hash())


def test_records_without_a_time_are_folded_in_and_dropped(
        base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_root(base, tmp_path)
    enc = base.encoder
    live_new = Item(item_id="live-1", title="green wool lamp", attributes={"category": "lamp"}, images=(png((0, 200, 0)),))
    live_old = Item(item_id="live-2", title="blue cotton shirt")  # logged under an older model version
    changed = Item(item_id="item-005", title="red leather bag, restyled", attributes={"category": "bag"})
    server = WriteLog(root / LOG_FILE)  # a running server holds the log open in its own process
    server.append([upsert(enc, live_new, VERSION), upsert(enc, live_old, "0"), upsert(enc, changed, VERSION),
                   LogRecord(op="delete", item_id="item-007", model_version=VERSION),
                   upsert(enc, Item(item_id="gone", title="short lived"), VERSION),
                   LogRecord(op="delete", item_id="gone", model_version=VERSION)])
    meanwhile = upsert(enc, Item(item_id="live-3", title="written while the reindex ran"), VERSION)
    real_publish = reindex_module.publish_index

    def publish_while_the_server_writes(*args: object, **kwargs: object) -> PublishedIndex:
        server.append([meanwhile])  # after the job read the log, before it truncates it
        return real_publish(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reindex_module, "publish_index", publish_while_the_server_writes)
    result = reindex(base.catalog, enc, "tiny", VERSION, root, FLAT)

    assert (result.folded, result.pending, result.count) == (5, 0, N_ITEMS - 2 + 2 - 1)  # no times: all dropped
    published = load_version(root)
    vectors = vectors_by_id(published)
    assert {"live-1", "live-2", "item-005"} <= set(vectors) and not {"item-007", "gone", "live-3"} & set(vectors)
    np.testing.assert_array_equal(vectors["live-1"], server.records[0].vector)  # same version: the logged vector
    np.testing.assert_allclose(vectors["live-2"], enc.encode([live_old])[0], atol=1e-5)  # re-embedded
    np.testing.assert_allclose(vectors["item-005"], enc.encode([changed])[0], atol=1e-5)
    assert published.ids.content_hashes[published.ids.label("item-005")] == changed.content_hash()  # type: ignore[index]
    assert published.ids.attributes[published.ids.label("live-1")] == {"category": "lamp"}  # type: ignore[index]
    assert [r.item_id for r in WriteLog(root / LOG_FILE).records] == ["live-3"]  # what came after the read stays
    server.append([LogRecord(op="delete", item_id="live-1", model_version=VERSION)])  # the server writes on
    server.close()
    assert [r.item_id for r in WriteLog(root / LOG_FILE).records] == ["live-3", "live-1"]


def test_each_publication_keeps_the_newest_versions(base: Base, tmp_path: Path) -> None:
    root = copy_root(base, tmp_path)
    published = [read_current(root)]
    for _ in range(3):
        result = reindex(base.catalog, base.encoder, "tiny", VERSION, root, FLAT, incremental=True, keep_versions=2)
        assert (result.reused, result.embedded) == (N_ITEMS - 2, 0)
        published.append(result.index_version)
    assert list_versions(root) == published[-2:] and read_current(root) == published[-1]
    assert result.pruned == (published[-3],)


@pytest.mark.parametrize("bad", [dict(shard_size=0), dict(keep_versions=0)])
def test_bad_settings_are_refused(base: Base, tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        reindex(base.catalog, base.encoder, "tiny", VERSION, tmp_path, FLAT, **bad)  # type: ignore[arg-type]


def test_a_catalog_with_nothing_embeddable_publishes_nothing(base: Base, tmp_path: Path) -> None:
    only_broken = [r for r in rows(N_ITEMS) if r["item_id"] in BROKEN]
    for r in only_broken:
        r["title"], r["description"] = "", ""
        r["attributes"] = None
    catalog = write_catalog(tmp_path / "data", only_broken)
    with pytest.raises(ValueError, match="no item could be embedded"):
        reindex(catalog, base.encoder, "tiny", VERSION, tmp_path / "index", FLAT)
    assert read_current(tmp_path / "index") is None



@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray for the module (starting one costs ~5 s on 2 shared cores, its actors a few more)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow  # a local Ray + one actor: 39 s (setup + call) at load average 7-10, 71 s at 15
def test_the_ray_engine_gives_the_local_vectors_and_writes_resumable_shards_as_it_goes(
        base: Base, tmp_path: Path, ray_session: None) -> None:
    from training.reindex.ray_engine import RayEngine

    root = tmp_path / "index"
    on_disk: list[int] = []

    def count_shards(n: int) -> None:  # what a crash at this point would leave to resume from
        on_disk.append(len(list(default_work_dir(root, VERSION).glob("shard-*.parquet"))))

    engine = RayEngine(base.encoder_dir, batch_size=4, block_rows=8)
    result = reindex(base.catalog, base.encoder, "tiny", VERSION, root, FLAT, count_shards, shard_size=8,
                     engine=engine)
    assert (result.embedded, result.skipped, result.count) == (N_ITEMS - 2, 2, N_ITEMS - 2)
    # shards reach the disk while the job runs (Ray 2.60 returns a block per report: [1, 2, 3, 4, 5])
    assert on_disk == sorted(on_disk) and on_disk[0] < on_disk[-1] == N_ITEMS // 8
    local, ray = load_version(base.root), load_version(root)
    assert ray.ids.item_ids == local.ids.item_ids  # same order: Ray keeps the catalog order
    np.testing.assert_allclose(ray.vectors, local.vectors, rtol=0, atol=1e-6)


@pytest.mark.slow  # one more Ray job on the module's Ray: 19 s measured at load average ~10
def test_the_reindex_command_runs_the_ray_engine(base: Base, tmp_path: Path, ray_session: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from onetower.cli import app

    monkeypatch.chdir(tmp_path)  # the default sqlite tracking store goes here
    result = CliRunner().invoke(app, ["reindex", "--catalog", str(base.catalog), "--index-root", str(tmp_path / "ix"),
                                      "--model", str(base.encoder_dir), "--device", "cpu", "--kind", "flat",
                                      "--batch-size", "4", "--engine", "ray"],
                                env={"ONETOWER_REINDEX_ENGINE": "", "RAY_ADDRESS": ""})
    assert result.exit_code == 0, result.output
    assert f"{N_ITEMS - 2} embedded" in " ".join(result.output.split())
    np.testing.assert_allclose(load_version(tmp_path / "ix").vectors, load_version(base.root).vectors, rtol=0,
                               atol=1e-6)


def test_a_lagging_catalog_does_not_undo_live_writes_and_a_newer_row_replaces_one(base: Base, tmp_path: Path) -> None:
    root, enc = copy_root(base, tmp_path), base.encoder
    t0 = 1_800_000_000_000  # ms since the epoch: the catalog's rows are from t0, the live writes after
    at = lambda ms: datetime.fromtimestamp(ms / 1000, UTC)  # noqa: E731
    lagging = write_catalog(tmp_path / "lagging", [r | {"updated_at": at(t0)} for r in rows(N_ITEMS)])
    new, changed = Item(item_id="live-1", title="green wool lamp"), Item(item_id="item-005", title="a bag, restyled")
    log = WriteLog(root / LOG_FILE)
    log.append([dataclasses.replace(upsert(enc, new, VERSION), written_ms=t0 + 10),
                dataclasses.replace(upsert(enc, changed, VERSION), written_ms=t0 + 20),
                LogRecord(op="delete", item_id="item-007", model_version=VERSION, written_ms=t0 + 30)])
    log.close()

    for _ in range(2):  # a nightly reindex from an upstream snapshot that lags, twice: the writes stay
        result = reindex(lagging, enc, "tiny", VERSION, root, FLAT)
        assert (result.folded, result.pending, result.replaced) == (3, 3, 0)
        published = load_version(root)
        assert "live-1" in published.ids and "item-007" not in published.ids
        assert published.ids.content_hashes[published.ids.label("item-005")] == changed.content_hash()  # type: ignore[index]
        served = LiveIndex(published, WriteLog(root / LOG_FILE), VERSION)
        assert served.fresh_items == 0 and len(served) == published.manifest.count  # kept records: no-ops
        served.log.close()  # type: ignore[union-attr]

    # upstream catches up: live-1 as written; item-005 edited again after the live write; item-007 not deleted yet
    caught_up = [r | {"updated_at": at(t0)} for r in rows(N_ITEMS) if r["item_id"] != "item-005"]
    caught_up += [{"item_id": "live-1", "title": "green wool lamp", "description": "", "attributes": "{}",
                   "colour": None, "updated_at": at(t0 + 5)},
                  {"item_id": "item-005", "title": "a bag, third edit", "description": "", "attributes": "{}",
                   "colour": None, "updated_at": at(t0 + 25)}]
    result = reindex(write_catalog(tmp_path / "caught-up", caught_up), enc, "tiny", VERSION, root, FLAT)
    assert (result.folded, result.pending, result.replaced) == (2, 1, 1)
    published = load_version(root)
    third = Item(item_id="item-005", title="a bag, third edit").content_hash()
    assert published.ids.content_hashes[published.ids.label("item-005")] == third  # type: ignore[index]
    assert "live-1" in published.ids and "item-007" not in published.ids
    assert [(r.op, r.item_id) for r in WriteLog(root / LOG_FILE).records] == [("delete", "item-007")]
