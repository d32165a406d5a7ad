"""The write log shared by two writers (a server appending, a reindex truncating): nothing is lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from index.errors import LogRewrittenError
from index.log import LogRecord, WriteLog

REPO = Path(__file__).resolve().parents[3]


def _upsert(i: int) -> LogRecord:
    return LogRecord(op="upsert", item_id=f"item-{i}", model_version="1", vector=np.full(4, i, np.float32),
                     content={"title": f"t{i}"}, content_hash=f"{i:064x}")


def _ids(records: list[LogRecord]) -> list[str]:
    return [r.item_id for r in records]


def test_a_truncate_keeps_what_another_writer_appended_since_it_read(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    server = WriteLog(path)
    server.append([_upsert(0), _upsert(1)])
    job = WriteLog(path)  # reads 0 and 1
    server.append([_upsert(2)])
    job.truncate(keep_from=2)
    assert _ids(job.records) == ["item-2"]
    server.append([_upsert(3)])  # finds the file replaced, rereads it, appends to the new one
    assert _ids(server.records) == ["item-2", "item-3"]
    job.close()
    server.close()
    assert _ids(WriteLog(path).records) == ["item-2", "item-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.log"]


def test_a_truncate_by_position_is_refused_after_another_writer_truncated(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    first = WriteLog(path)
    first.append([_upsert(0), _upsert(1), _upsert(2)])
    second = WriteLog(path)
    first.truncate(keep_from=1)
    with pytest.raises(LogRewrittenError, match="first 2 records"):
        second.truncate(keep_from=2)
    second.truncate(keep_from=0)  # dropping nothing is always safe
    assert _ids(WriteLog(path).records) == ["item-1", "item-2"]


def test_appends_from_another_process_survive_repeated_truncation(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from index.log import LogRecord, WriteLog
        log = WriteLog(Path({str(path)!r}))
        for i in range(60):
            log.append([LogRecord(op="upsert", item_id=f"item-{{i}}", model_version="1",
                                  vector=np.zeros(4, np.float32))])
        """)], cwd=REPO)
    dropped: list[str] = []
    while child.poll() is None or not dropped:
        job = WriteLog(path)
        seen = job.records
        job.truncate(keep_from=len(seen))
        job.close()
        dropped += _ids(seen)
        time.sleep(0.002)
    assert child.wait(timeout=60) == 0
    assert dropped + _ids(WriteLog(path).records) == [f"item-{i}" for i in range(60)]
