"""Reliability through a real server: a full disk under the live log, garbage on the wire, saturation,
tiny deadlines, animated images and corrupt index versions offered for a swap. Each test does the damage for real (see docs/RELIABILITY.md)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from index.errors import IndexProbeError
from index.log import WriteLog
from index.probe import probe_version
from index.publish import (
    DATA_FILES,
    INDEX_FILE,
    MANIFEST_CHECKSUM,
    MANIFEST_FILE,
    VERSIONS,
    load_version,
    read_current,
    set_current,
)
from protos.onetower.v1 import onetower_pb2 as pb
from service import snapshot
from service.client import Client
from service.server import RunningServer, start_server

from .conftest import Served, make_config


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code(), err.value.details()


def _noise_png(seed: int, size: int = 56) -> bytes:
    """A PNG that does not compress (about 9 KB): its log frame is larger than a page."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _own_index_root(served: Served, dest: Path) -> Path:
    """A private copy of the published index (without the shared live log)."""
    return Path(shutil.copytree(served.root / "index", dest, ignore=shutil.ignore_patterns("live.log", "*.tmp")))


def _fill(directory: Path) -> Path:
    """Write a file in `directory` until the filesystem says ENOSPC (capped, in case it is not the tmpfs)."""
    assert os.path.ismount(directory), "refusing to fill a directory that is not its own small filesystem"
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(4096):  # 2 MiB at most
            os.write(fd, b"\0" * 512)
        raise AssertionError("the filesystem never filled up")
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)
    return filler


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for this test (needs root / CAP_SYS_ADMIN; skips otherwise, fails under CI=true)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0 or not os.path.ismount(mnt):
        why = f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}"
        if os.environ.get("CI") == "true":  # CI runs as root: a missing prerequisite fails there, never skips
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _log_ids(path: Path) -> list[str]:
    log = WriteLog(path)
    try:
        return [r.item_id for r in log.records]
    finally:
        log.close()


def _storage_refusal_then_retry(served: Served, root: Path, break_disk, heal_disk,  # type: ignore[no-untyped-def]
                                first_ok: bool = True) -> None:
    running = start_server(make_config(served, index_root=root))
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=20) as c:
            if first_ok:
                c.upsert([pb.Item(item_id="ok-1", title="blue cotton shirt")])
            before = c.info().item_count
            break_disk()
            # A frame of about 5.5 KB: more than the log's last page has left, less than a write buffer
            # (8 KiB), so a buffered log would keep the refused bytes and write them with the next append.
            big = pb.Item(item_id="big-1", title="leather bag", images=[_noise_png(1, 36)])
            code, details = _code(c.upsert, [big])
            assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("storage_error"), (code, details)
            code, _ = _code(c.embeddings, ["big-1"])
            assert code == grpc.StatusCode.NOT_FOUND
            assert c.health_status() == "SERVING" and c.info().item_count == before
            assert c.embeddings(["ok-1" if first_ok else "item-001"])  # reads go on
            heal_disk()
            assert c.upsert([big]).upserted == 1  # the retry succeeds
            assert c.embeddings(["big-1"]) and c.info().item_count == before + 1
    finally:
        running.stop(grace=1)
    # What is on disk is exactly what was acknowledged: no half frame, no refused batch flushed later.
    acknowledged = ["ok-1", "big-1"] if first_ok else ["big-1"]
    assert _log_ids(root / "live.log") == acknowledged
    again = start_server(make_config(served, index_root=root))
    try:
        with Client(f"127.0.0.1:{again.port}", timeout=20) as c:
            assert set(c.embeddings(acknowledged)) == set(acknowledged)
    finally:
        again.stop(grace=1)


def test_enospc_on_a_full_tmpfs_refuses_the_upsert(served: Served, tmp_path: Path, tiny_disk: Path) -> None:
    root = _own_index_root(served, tmp_path / "index")
    (root / "live.log").symlink_to(tiny_disk / "live.log")
    filler: list[Path] = []
    _storage_refusal_then_retry(served, root, lambda: filler.append(_fill(tiny_disk)),
                                lambda: filler.pop().unlink())


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_enospc_from_dev_full_refuses_the_upsert(served: Served, tmp_path: Path) -> None:
    root = _own_index_root(served, tmp_path / "index")
    log = root / "live.log"
    # The log is /dev/full from the start (a character device never ends when read, so it cannot be
    # swapped in under a running server): every append fails with a real ENOSPC and cannot be truncated.
    log.symlink_to("/dev/full")

    def back_to_disk() -> None:  # the server sees the log replaced and reopens it
        log.unlink()
        log.touch()

    _storage_refusal_then_retry(served, root, lambda: None, back_to_disk, first_ok=False)


def test_garbage_on_the_wire_is_survived(server: RunningServer, client: Client) -> None:
    rng = np.random.default_rng(7)
    payloads = [rng.bytes(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.bytes(300), b"\x16\x03\x01\x02\x00" + rng.bytes(64), b""]
    for data in payloads:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            if data:
                s.sendall(data)
            s.settimeout(1)
            try:
                s.recv(1024)  # whatever the server answers (a GOAWAY, or nothing) before it closes
            except (TimeoutError, ConnectionError):
                pass
    assert client.health_status() == "SERVING"
    assert client.info().dim == 64


def test_health_answers_while_the_encoder_is_saturated(served: Served) -> None:
    running = start_server(make_config(served, workers=2, max_queue=1))
    codes: list[grpc.StatusCode] = []
    stop = threading.Event()
    item = pb.Item(title="blue leather bag", images=[_noise_png(3, 96)])

    def flood() -> None:
        with Client(f"127.0.0.1:{running.port}", timeout=5) as c:
            while not stop.is_set():
                try:
                    c.stub.EmbedItems(pb.EmbedItemsRequest(items=[item] * 8), timeout=2)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())

    threads = [threading.Thread(target=flood) for _ in range(12)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        with Client(f"127.0.0.1:{running.port}", timeout=5) as probe:
            for _ in range(5):  # 2 handler threads are shared by the flood and the probe: a 5 s deadline
                assert probe.health_status() == "SERVING"
                time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        running.stop(grace=1)
    print("flood:", {c.name: codes.count(c) for c in set(codes)})  # shown with -s
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert codes and set(codes) <= allowed, {c.name: codes.count(c) for c in set(codes)}


def test_one_millisecond_deadline(client: Client) -> None:
    # work that takes several ms (one 4 px item once finished inside 1 ms on a quiet machine); 8: the limit
    req = pb.EmbedItemsRequest(items=[pb.Item(title=f"red mug {i}", images=[_noise_png(i, 64)]) for i in range(8)])
    for _ in range(3):
        code, _ = _code(client.stub.EmbedItems, req, timeout=0.001)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.health_status() == "SERVING"
    assert len(client.stub.EmbedItems(req, timeout=20).embeddings) == 8


def _frames() -> list[Image.Image]:
    first = Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    second = Image.new("RGB", (48, 48), (20, 220, 40))
    return [first, second]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_embeds_its_first_frame(client: Client, fmt: str) -> None:
    frames = _frames()
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    animated = buf.getvalue()
    with Image.open(io.BytesIO(animated)) as im:
        assert getattr(im, "n_frames", 1) == 2, "the file is not animated"
        im.seek(0)
        still = io.BytesIO()
        im.convert("RGB").save(still, format="PNG")
        im.seek(1)
        second = io.BytesIO()
        im.convert("RGB").save(second, format="PNG")
    resp = client.stub.EmbedItems(pb.EmbedItemsRequest(items=[
        pb.Item(images=[animated]), pb.Item(images=[still.getvalue()]), pb.Item(images=[second.getvalue()])]),
        timeout=20)
    anim, first, other = (np.asarray(e.vector.values) for e in resp.embeddings)
    cos = float(anim @ first / np.linalg.norm(anim) / np.linalg.norm(first))
    cos_other = float(anim @ other / np.linalg.norm(anim) / np.linalg.norm(other))
    assert cos > 0.99, cos
    assert cos > cos_other, (cos, cos_other)


def _rehashed_copy(root: Path, version: str, name: str, damage: Callable[[Path], None]) -> str:
    """A copy of `version` as `name`, damaged, its manifest rehashed over the damage (a buggy writer's)."""
    directory = root / VERSIONS / name
    shutil.copytree(root / VERSIONS / version, directory)
    damage(directory)
    data = {k: v for k, v in json.loads((directory / MANIFEST_FILE).read_text()).items() if k != MANIFEST_CHECKSUM}
    data["index_version"] = name
    data["files"] = {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in DATA_FILES}
    (directory / MANIFEST_FILE).write_text(json.dumps(data))  # no self-checksum: read as a legacy manifest
    return name


def test_a_corrupt_version_with_a_rehashed_manifest_is_refused_once_and_the_last_good_served(
        served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _own_index_root(served, tmp_path / "index")
    good = read_current(root)
    assert good is not None
    probes: list[str] = []
    monkeypatch.setattr(snapshot, "probe_version", lambda r, v: probes.append(v) or probe_version(r, v))
    running = start_server(make_config(served, index_root=root))
    try:
        assert probes == [good]  # the startup version is proven too
        half = _rehashed_copy(root, good, "v-truncated", lambda d: (d / INDEX_FILE).write_bytes(
            (d / INDEX_FILE).read_bytes()[:1000]))
        with pytest.raises(RuntimeError):  # FAISS itself reads these bytes, were they loaded in the server
            load_version(root, half)
        renamed = _rehashed_copy(root, good, "v-renamed", lambda d: None)
        (root / VERSIONS / renamed / MANIFEST_FILE).write_text(
            (root / VERSIONS / renamed / MANIFEST_FILE).read_text().replace("v-renamed", good))
        for bad, why in ((half, f"{half}/{INDEX_FILE} could not be read"), (renamed, "not its folder's name")):
            set_current(root, bad)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="service.snapshot"):
                for _ in range(3):  # what the watcher does on its polls: one probe, one warning
                    with pytest.raises(IndexProbeError, match=why):
                        running.holder.refresh()
            refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing")]
            assert len(refusals) == 1 and f"refusing index version {bad} (still serving {good})" in refusals[0]
            assert probes.count(bad) == 1
            with Client(f"127.0.0.1:{running.port}") as c:
                assert c.health_status() == "SERVING"
                assert c.info().index_version == good
                assert len(c.similar(item_ids=[served.items[0].item_id], k=5)[0]) == 5
        sound = _rehashed_copy(root, good, "v-sound", lambda d: None)
        set_current(root, sound)
        assert running.holder.refresh()  # a sound version is still taken
        with Client(f"127.0.0.1:{running.port}") as c:
            assert c.info().index_version == sound
    finally:
        running.stop(grace=1)
