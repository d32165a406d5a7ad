"""The fsync'd live-write log (`index.log`): round trips, torn tails, corruption, truncation."""

from __future__ import annotations

import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from index.errors import CorruptLogError, LogRewrittenError
from index.log import LogRecord, WriteLog

DIM = 8


def _upsert(i: int, images: tuple[bytes, ...] = ()) -> LogRecord:
    rng = np.random.default_rng(i)
    return LogRecord(op="upsert", item_id=f"item-{i}", model_version="7",
                     vector=rng.normal(size=DIM).astype(np.float32),
                     content={"title": f"title {i} ünï 😀", "description": "", "attributes": {"colour": "red"},
                              "images": list(images)},
                     content_hash=f"{i:064x}")


def _same(a: LogRecord, b: LogRecord) -> None:
    assert (a.op, a.item_id, a.model_version, a.content_hash) == (b.op, b.item_id, b.model_version, b.content_hash)
    if a.vector is None:
        assert b.vector is None
    else:
        assert b.vector is not None and b.vector.dtype == np.float32
        assert a.vector.tobytes() == b.vector.tobytes()  # bitwise
    assert {**a.content, "images": list(a.content.get("images", []))} == dict(b.content)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "live" / "writes.log"


@pytest.fixture
def records() -> list[LogRecord]:
    odd_bytes = bytes(range(256)) * 3
    return [_upsert(0, (b"\x89PNG\r\n\x1a\n...", odd_bytes)), _upsert(1),
            LogRecord(op="delete", item_id="item-0", model_version="7"), _upsert(2, (b"",)), _upsert(3)]


def _write(path: Path, records: list[LogRecord]) -> list[int]:
    """Append one record at a time; returns the file size after each."""
    log = WriteLog(path)
    sizes = []
    for r in records:
        log.append([r])
        sizes.append(path.stat().st_size)
    log.close()
    return sizes


def test_append_and_reopen_round_trip(path: Path, records: list[LogRecord]) -> None:
    log = WriteLog(path)
    assert len(log) == 0 and log.records == []
    log.append(records[:2])
    log.append(records[2:])
    assert len(log) == len(records)
    log.close()
    back = WriteLog(path).records
    assert len(back) == len(records)
    for a, b in zip(records, back, strict=True):
        _same(a, b)
    assert back[0].content["images"][1] == bytes(range(256)) * 3
    assert back[3].content["images"] == [b""]
    assert back[2].vector is None and back[2].op == "delete"


def test_special_floats_survive_bitwise(path: Path) -> None:
    v = np.array([0.0, -0.0, 1e-45, 3.4028235e38, np.float32(1) / 3, -1.5, 2.0**-20, 7.0], np.float32)
    log = WriteLog(path)
    log.append([LogRecord(op="upsert", item_id="x", model_version="1", vector=v)])
    log.close()
    back = WriteLog(path).records[0].vector
    assert back is not None and back.tobytes() == v.tobytes()


@pytest.mark.parametrize("cut", [1, 4, 7, 8, 9, 20, -1])
def test_torn_last_frame_is_dropped(path: Path, records: list[LogRecord], cut: int) -> None:
    sizes = _write(path, records)
    good_end = sizes[-2]
    torn = good_end + cut if cut > 0 else sizes[-1] + cut  # inside the last frame
    with path.open("r+b") as f:
        f.truncate(torn)
    log = WriteLog(path)
    assert len(log) == len(records) - 1
    assert path.stat().st_size == good_end  # the tail is cut off on open
    for a, b in zip(records[:-1], log.records, strict=True):
        _same(a, b)
    log.append([_upsert(9)])  # later appends land after the good frames and survive a reopen
    log.close()
    back = WriteLog(path).records
    assert [r.item_id for r in back] == [r.item_id for r in records[:-1]] + ["item-9"]


@pytest.mark.parametrize("tail", [
    b"\x01", b"\x00" * 7, b"\x00" * 64, b"\xde\xad\xbe", bytes(np.random.default_rng(5).integers(0, 256, 13, np.uint8)),
    bytes(np.random.default_rng(6).integers(0, 256, 4096, np.uint8)), b"\xff" * 100,
], ids=["1-byte", "7-zeros", "64-zeros", "3-random", "13-random", "4k-random", "100-ff"])
def test_garbage_tail_is_dropped(path: Path, records: list[LogRecord], tail: bytes) -> None:
    sizes = _write(path, records)
    with path.open("ab") as f:
        f.write(tail)
    log = WriteLog(path)
    assert len(log) == len(records)
    assert path.stat().st_size == sizes[-1]
    log.append([_upsert(9)])
    log.close()
    assert [r.item_id for r in WriteLog(path).records][-2:] == ["item-3", "item-9"]


def test_a_frame_cut_by_a_partial_write_and_then_a_full_one_is_corruption(path: Path,
                                                                         records: list[LogRecord]) -> None:
    sizes = _write(path, records[:2])
    data = path.read_bytes()
    path.write_bytes(data[: sizes[0] + 10] + data[sizes[0]:])  # half of frame 1, then frame 1 whole
    with pytest.raises(CorruptLogError, match="frame 1"):
        WriteLog(path)


@pytest.mark.parametrize("where", ["length", "crc", "payload-start", "payload-middle"])
def test_flipped_byte_in_a_middle_frame_is_corruption(path: Path, records: list[LogRecord], where: str) -> None:
    sizes = _write(path, records)
    start, end = sizes[1], sizes[2]  # frame 2
    offset = {"length": start, "crc": start + 5, "payload-start": start + 8, "payload-middle": (start + end) // 2}
    data = bytearray(path.read_bytes())
    data[offset[where]] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match=f"frame 2 at byte {start}"):
        WriteLog(path)
    assert path.stat().st_size == sizes[-1]  # nothing was cut off


def test_flipped_byte_in_the_first_frame_is_corruption(path: Path, records: list[LogRecord]) -> None:
    _write(path, records)
    data = bytearray(path.read_bytes())
    data[30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match="frame 0 at byte 0"):
        WriteLog(path)


def test_flipped_byte_in_the_last_frame_reads_as_a_torn_tail(path: Path, records: list[LogRecord]) -> None:
    sizes = _write(path, records)
    data = bytearray(path.read_bytes())
    data[(sizes[-2] + sizes[-1]) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert [r.item_id for r in WriteLog(path).records] == [r.item_id for r in records[:-1]]


def test_intact_frame_with_a_bad_record_is_corruption(path: Path) -> None:
    payload = b'{"item_id": "x"}'  # no "op"
    path.parent.mkdir(parents=True)
    path.write_bytes(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    with pytest.raises(CorruptLogError, match="unreadable"):
        WriteLog(path)


@pytest.mark.parametrize("keep_from", [0, 2, 5])
def test_truncate_keeps_records_from_an_index(path: Path, records: list[LogRecord], keep_from: int) -> None:
    log = WriteLog(path)
    log.append(records)
    log.truncate(keep_from)
    assert [r.item_id for r in log.records] == [r.item_id for r in records[keep_from:]]
    log.append([_upsert(9)])
    log.close()
    back = WriteLog(path).records
    assert [r.item_id for r in back] == [r.item_id for r in records[keep_from:]] + ["item-9"]
    for a, b in zip(records[keep_from:], back, strict=False):
        _same(a, b)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_truncate_keeps_the_records_asked_for_and_a_reader_follows(path: Path, records: list[LogRecord]) -> None:
    log, reader = WriteLog(path), WriteLog(path)
    log.append(records)
    seen = log.view()[0]  # a follower that had applied every record of this generation
    log.truncate(keep_from=len(records) - 1, keep=[2, 0, 2])
    kept = [records[0], records[2], records[-1]]
    assert [r.item_id for r in log.records] == [r.item_id for r in kept]
    assert log.translate(seen, len(records)) == (log.view()[0], 3)  # ... has applied all 3 kept
    assert log.translate(seen, 1) == (log.view()[0], 1)  # one that had applied only the first: 1 of them
    reader.sync()
    assert [r.item_id for r in reader.records] == [r.item_id for r in kept]
    with pytest.raises(ValueError, match="keep"):
        log.truncate(keep_from=1, keep=[1])
    for a, b in zip(kept, WriteLog(path).records, strict=True):
        _same(a, b)


def test_the_write_time_round_trips_and_old_records_read_as_unknown(path: Path) -> None:
    log = WriteLog(path)
    log.append([LogRecord(op="delete", item_id="a", written_ms=1_800_000_000_123)])
    assert log.records[0].written_ms == 1_800_000_000_123
    assert LogRecord.from_bytes(b'{"op":"delete","item_id":"b"}').written_ms == 0  # written before it had one


def test_concurrent_appends_are_all_kept_whole(path: Path) -> None:
    log = WriteLog(path)

    def writer(t: int) -> None:
        for i in range(25):
            log.append([_upsert(1000 * t + i), _upsert(1000 * t + i + 500)])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    back = WriteLog(path).records
    assert len(back) == 200
    ids = [r.item_id for r in back]
    assert len(set(ids)) == 200
    for i in range(0, 200, 2):  # each append's records stay adjacent, in order
        a, b = int(ids[i].split("-")[1]), int(ids[i + 1].split("-")[1])
        assert b == a + 500


def _item(i: int, version: int, size: int = 2000) -> LogRecord:
    image = np.random.default_rng(1000 * i + version).bytes(size)
    return LogRecord(op="upsert", item_id=f"item-{i}", model_version="7", vector=np.full(DIM, version, np.float32),
                     content={"title": f"v{version}", "images": [image]}, content_hash=f"{i}-{version}")


def test_compact_keeps_the_newest_record_of_each_item_and_every_delete(path: Path) -> None:
    log = WriteLog(path)
    log.append([_item(i, 1) for i in range(4)])
    log.append([_item(0, 2), LogRecord(op="delete", item_id="item-1", model_version="7"), _item(2, 2)])
    superseded = log.superseded_bytes
    assert superseded > 0 and log.size_bytes == path.stat().st_size
    assert log.compact() == superseded
    kept = [(r.item_id, r.op, r.content.get("title")) for r in log.records]
    assert kept == [("item-3", "upsert", "v1"), ("item-0", "upsert", "v2"), ("item-1", "delete", None),
                    ("item-2", "upsert", "v2")]
    assert log.superseded_bytes == 0 and log.size_bytes == path.stat().st_size
    assert log.compact() == 0  # nothing left to drop
    log.append([_item(3, 2)])  # appends go on after a compaction
    log.close()
    back = WriteLog(path)
    assert [(r.item_id, r.content.get("title")) for r in back.records][-2:] == [("item-2", "v2"), ("item-3", "v2")]
    _same(back.records[1], _item(0, 2))  # frames are copied as they were


def test_compact_soon_runs_only_when_superseded_bytes_outweigh_the_live(path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("index.log.COMPACT_MIN_BYTES", 10_000)
    log = WriteLog(path)
    log.append([_item(i, 1) for i in range(10)])  # ~30 KB live
    log.append([_item(i, 2) for i in range(3)])  # ~9 KB superseded: under the live bytes
    log.compact_soon()
    assert log.compactions == 0 and not log.wants_compaction()
    log.append([_item(i, 3) for i in range(3, 10)])  # now ~30 KB superseded
    assert log.wants_compaction()
    log.compact_soon()
    log.close()  # waits for the background compaction
    assert log.compactions == 1
    assert len(WriteLog(path)) == 10


def test_a_crash_during_compaction_leaves_the_log_whole(path: Path) -> None:
    log = WriteLog(path)
    log.append([_item(0, 1), _item(0, 2), _item(1, 1)])
    log.close()
    before = path.read_bytes()
    path.with_suffix(".tmp").write_bytes(before[:50])  # a compaction that died before its rename
    log = WriteLog(path)
    assert [r.content["title"] for r in log.records] == ["v1", "v2", "v1"]
    log.compact()
    assert [r.content["title"] for r in WriteLog(path).records] == ["v2", "v1"]


def test_entries_read_before_a_compaction_are_refused_after_it(path: Path) -> None:
    log = WriteLog(path)
    log.append([_item(0, 1), _item(0, 2), _item(1, 1)])
    old = log.entries
    log.compact()
    with pytest.raises(LogRewrittenError):
        list(log.read(old[2:]))
    assert [r.item_id for r in log.read(log.entries)] == ["item-0", "item-1"]


def test_a_reindex_truncate_after_a_server_compaction_keeps_the_log_whole(path: Path) -> None:
    server = WriteLog(path)
    server.append([_item(0, 1), _item(1, 1)])
    job = WriteLog(path)  # a reindex reads both records and folds them
    server.append([_item(0, 2)])
    server.compact()  # drops item-0 v1, which the job folded
    with pytest.raises(LogRewrittenError):
        job.truncate(keep_from=2)
    assert [(r.item_id, r.content["title"]) for r in WriteLog(path).records] == [("item-1", "v1"), ("item-0", "v2")]


def test_memory_holds_entries_not_contents(path: Path) -> None:
    log = WriteLog(path)
    log.append([_item(i, 1, size=50_000) for i in range(20)])
    assert all(isinstance(e.offset, int) and e.size > 50_000 for e in log.entries)
    assert not any(isinstance(v, (bytes, dict)) for e in log.entries for v in e)  # no content is kept
