"""`reconcile_log`: per item written live, its newest log record against the catalog a reindex reads."""

from __future__ import annotations

import pytest

from index.compact import CatalogRow, reconcile_log
from index.log import LogRecord

T = 1_800_000_000_000  # ms since the epoch


def up(item_id: str, content_hash: str, written_ms: int = T) -> LogRecord:
    return LogRecord(op="upsert", item_id=item_id, model_version="1", content_hash=content_hash, written_ms=written_ms)


def delete(item_id: str, written_ms: int = T) -> LogRecord:
    return LogRecord(op="delete", item_id=item_id, model_version="1", written_ms=written_ms)


def row(*hashes: str, updated_ms: int | None = T - 1) -> CatalogRow:
    return CatalogRow(frozenset(hashes), updated_ms)


@pytest.mark.parametrize("record, catalog_row, folded, kept, replaced", [
    (up("a", "h1"), None, True, True, 0),  # new item the catalog lacks: wins, kept until it shows
    (up("a", "h1"), row("h1"), True, False, 0),  # the catalog shows the write: folded, dropped
    (up("a", "h1"), row("h0", "h1"), True, False, 0),  # shows it with image metadata stripped
    (up("a", "h1"), row("h0"), True, True, 0),  # the catalog still has the old content
    (up("a", "h1"), row("h0", updated_ms=None), True, True, 0),  # no updated_at: the write wins, kept
    (up("a", "h1"), row("h2", updated_ms=T), False, False, 1),  # updated at the write's ms: the catalog wins
    (up("a", "h1"), row("h2", updated_ms=T + 1), False, False, 1),  # updated after the write
    (delete("a"), row("h0"), True, True, 0),  # the catalog still has a deleted item: deleted, kept
    (delete("a"), None, True, False, 0),  # the catalog no longer has it: dropped
    (delete("a"), row("h0", updated_ms=T + 1), False, False, 1),  # re-added upstream after the delete
    (up("a", "h1", written_ms=0), row("h0", updated_ms=T + 1), True, False, 0),  # no time: folded, dropped
])
def test_one_item(record: LogRecord, catalog_row: CatalogRow | None, folded: bool, kept: bool, replaced: int) -> None:
    plan = reconcile_log([record], {} if catalog_row is None else {"a": catalog_row})
    assert (plan.fold == [record], plan.keep == [0], plan.replaced) == (folded, kept, replaced)


def test_the_newest_record_of_an_item_decides_and_older_ones_go() -> None:
    records = [up("a", "h1", T), up("b", "h5", T), delete("a", T + 10), up("a", "h2", T + 20), up("c", "h9", T)]
    plan = reconcile_log(records, {"a": row("h0", updated_ms=T + 15), "c": row("h9")})
    assert [(r.item_id, r.content_hash) for r in plan.fold] == [("b", "h5"), ("a", "h2"), ("c", "h9")]
    assert plan.keep == [1, 3]  # b (not in the catalog) and a's newest (the catalog has h0); c shows; the rest superseded
    assert plan.replaced == 0
