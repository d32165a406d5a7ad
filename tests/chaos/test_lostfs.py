"""The lost-write filesystem itself: what survives a power cut and what does not, and injected errors."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.fsops import write_file
from tests.chaos.lostfs import Fault, LostMount


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_write_without_fsync_is_gone_after_a_cut(lostfs: LostMount) -> None:
    m = lostfs.mountpoint
    write_file(m / "kept", b"durable", fsync=True)
    _fsync_dir(m)
    with (m / "kept").open("ab") as f:  # appended, never fsync'd
        f.write(b" and lost")
    write_file(m / "new", b"never synced", fsync=False)
    assert (m / "kept").read_bytes() == b"durable and lost"  # readers see it before the cut
    report = lostfs.cut("drop")
    assert (m / "kept").read_bytes() == b"durable"
    assert not (m / "new").exists()
    assert report["bytes_dropped"] >= len(b" and lost")


def test_a_write_with_fsync_stays(lostfs: LostMount) -> None:
    m = lostfs.mountpoint
    (m / "d").mkdir()
    _fsync_dir(m)
    write_file(m / "d" / "f", b"x" * 100_000, fsync=True)
    _fsync_dir(m / "d")
    with (m / "d" / "f").open("r+b") as f:  # an overwrite inside the durable bytes, synced
        f.seek(10)
        f.write(b"yy")
        f.flush()
        os.fsync(f.fileno())
        f.seek(20)
        f.write(b"zz")  # and one not synced
    lostfs.cut("drop")
    data = (m / "d" / "f").read_bytes()
    assert len(data) == 100_000 and data[10:12] == b"yy" and data[20:22] == b"xx"


def test_a_file_fsynced_in_an_unsynced_directory_is_lost(lostfs: LostMount) -> None:
    m = lostfs.mountpoint
    write_file(m / "f", b"synced data, unsynced name", fsync=True)
    (m / "sub").mkdir()
    write_file(m / "sub" / "g", b"g", fsync=True)
    _fsync_dir(m / "sub")  # the folder's entries, but not the folder's own name in its parent
    lostfs.cut("drop")
    assert sorted(os.listdir(m)) == []


def test_a_rename_without_a_directory_fsync_may_go_either_way(lostfs: LostMount) -> None:
    m = lostfs.mountpoint
    outcomes = set()
    for seed in range(12):
        write_file(m / "CURRENT", b"old", fsync=True)
        _fsync_dir(m)
        write_file(m / "tmp", b"new", fsync=True)
        os.replace(m / "tmp", m / "CURRENT")  # no fsync of the folder
        lostfs.cut("random", seed=seed)
        outcomes.add((m / "CURRENT").read_bytes())
        assert (m / "CURRENT").read_bytes() in (b"old", b"new")  # never empty, never a mix
        for name in os.listdir(m):
            (m / name).unlink()
        _fsync_dir(m)
    assert outcomes == {b"old", b"new"}
    write_file(m / "CURRENT", b"old", fsync=True)
    _fsync_dir(m)
    write_file(m / "tmp", b"new", fsync=True)
    os.replace(m / "tmp", m / "CURRENT")
    lostfs.cut("drop")  # the pessimistic disk always undoes it
    assert (m / "CURRENT").read_bytes() == b"old" and not (m / "tmp").exists()
    write_file(m / "tmp", b"new", fsync=True)
    os.replace(m / "tmp", m / "CURRENT")
    _fsync_dir(m)  # with the folder's fsync it stays, in every mode
    lostfs.cut("random", seed=1)
    assert (m / "CURRENT").read_bytes() == b"new"


def test_an_unlink_and_a_folder_are_undone_whole(lostfs: LostMount) -> None:
    m = lostfs.mountpoint
    (m / "v").mkdir()
    write_file(m / "v" / "a", b"a", fsync=True)
    _fsync_dir(m / "v")
    _fsync_dir(m)
    (m / "v" / "a").unlink()  # not synced: it comes back
    (m / "w").mkdir()  # not synced: gone with its contents
    write_file(m / "w" / "b", b"b", fsync=True)
    _fsync_dir(m / "w")
    lostfs.cut("drop")
    assert (m / "v" / "a").read_bytes() == b"a" and not (m / "w").exists()


def test_random_cuts_tear_an_unsynced_tail(lostfs: LostMount) -> None:
    m = lostfs.mountpoint
    write_file(m / "log", b"head", fsync=True)
    _fsync_dir(m)
    seen = set()
    for seed in range(16):
        with (m / "log").open("ab") as f:
            f.write(b"-tail-never-synced")
        lostfs.cut("random", seed=seed)
        data = (m / "log").read_bytes()
        assert data.startswith(b"head") and len(data) <= len(b"head-tail-never-synced")
        seen.add("zeros" if b"\0" in data else "bytes" if len(data) > 4 else "none")
        with (m / "log").open("r+b") as f:
            f.truncate(4)
            f.flush()
            os.fsync(f.fileno())
    assert seen == {"zeros", "bytes", "none"}, seen


def test_flock_is_shared_between_processes(lostfs: LostMount) -> None:
    path = lostfs.mountpoint / "locked"
    write_file(path, b"", fsync=True)
    with path.open("rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        probe = ("import fcntl,sys\nf=open(sys.argv[1],'rb')\n"
                 "try:\n fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n sys.exit(3)")
        assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 3


@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
def test_injected_errors_reach_the_caller(lostfs: LostMount, error: str) -> None:
    m = lostfs.mountpoint
    lostfs.faults([Fault(op="write", path="/w*", error=error, after=1, times=1),
                   Fault(op="fsync", path="/s", error=error, times=0)])
    fd = os.open(m / "w1", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"first passes")
        with pytest.raises(OSError) as raised:
            os.write(fd, b"second fails")
        assert raised.value.errno == getattr(errno, error)
        os.write(fd, b"third passes")
    finally:
        os.close(fd)
    fd = os.open(m / "s", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x")
        for _ in range(2):  # every fsync of this file
            with pytest.raises(OSError) as raised:
                os.fsync(fd)
            assert raised.value.errno == getattr(errno, error)
    finally:
        os.close(fd)
    assert [f["fired"] for f in lostfs.stats()["faults"]] == [1, 2]


def test_a_failed_fsync_loses_its_data_even_after_a_later_good_one(lostfs: LostMount) -> None:
    m = lostfs.mountpoint
    write_file(m / "f", b"", fsync=True)
    _fsync_dir(m)
    lostfs.faults([Fault(op="fsync", path="/f", error="EIO")])
    fd = os.open(m / "f", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"AAAA")
        with pytest.raises(OSError):
            os.fsync(fd)
        os.write(fd, b"BBBB")
        os.fsync(fd)  # succeeds, yet the pages of the failed one were dropped
    finally:
        os.close(fd)
    lostfs.cut("drop")
    assert (m / "f").read_bytes() == b"\0\0\0\0BBBB"


def test_a_clean_unmount_keeps_everything(tmp_path: Path, lostfs: LostMount) -> None:
    write_file(lostfs.mountpoint / "f", b"unsynced", fsync=False)
    lostfs.unmount()
    assert (lostfs.backing / "f").read_bytes() == b"unsynced"
    assert sorted(os.listdir(lostfs.backing)) == ["f"]
