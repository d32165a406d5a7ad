"""Mutated index files offered to a running `onetower serve` (issue 19: "1,000 mutated index files").

A server follows `CURRENT` (a short `--poll-seconds`). Each offer copies a sound version (flat, the one
served; or an HNSW or IVF-PQ version of the same model kept outside the root), damages one of its files
(bit flips, truncation, zeroed ranges, huge counts in headers, random bytes, files swapped within the
version or taken from another version, bytes appended, a file deleted, manifest fields edited), and for
half the offers rehashes the manifest as a buggy writer would (so the checksums pass and only the
readers stand between the bytes and the process). Then `CURRENT` names it (`set_current`) and the
harness queries the server until it has decided, counting:

- refused: a log line names the version and why, and the last good version is still served;
- accepted: the damage was harmless to every reader and check, the version was served and answered;
- ignored: the edited manifest names another model, so the version is no candidate (as designed);
- failures: crashes (the process exited), UNKNOWN/INTERNAL answers, the last good version not served
  after a refusal, a refusal without a log line naming the version, no decision within DECIDE_S.

Each offer `i` draws from `random.Random(f"{seed}-{i}")`, so one offer is replayed by its index.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from index.config import IndexConfig
from index.ids import IdMap
from index.publish import (
    CURRENT,
    DATA_FILES,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_CHECKSUM,
    MANIFEST_FILE,
    VECTORS_FILE,
    VERSIONS,
    load_version,
    new_version_name,
    publish_index,
    read_current,
    set_current,
)
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from tests.chaos.world import ServeProc, World, fresh_root, quiet_env

POLL_SECONDS = 0.1
DECIDE_S = 30.0  # an offer the server has neither refused, ignored nor served by then counts as undecided
IGNORE_AFTER_S = 1.0  # a version of another model is no candidate: after this long unswapped, it was ignored
RPC_TIMEOUT_S = 10.0
IVFPQ_ITEMS = 1100  # IVF-PQ needs 1024+ points to train its codebooks (FAISS warns below 39 per centroid)
TARGETS = ((INDEX_FILE, 6), (IDS_FILE, 2), (VECTORS_FILE, 2), (MANIFEST_FILE, 1))  # file, weight
HUGE = (2**31 - 1, 2**32 + 7, 2**40, 2**62, 2**63 - 1, 2**64 - 1)
BAD = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclass
class MutatedFilesResult:
    """What `run_mutated_files` counted."""

    offered: int = 0
    rehashed: int = 0  # offers whose manifest was rehashed over the damaged files
    refused: int = 0  # outcomes, one per offer: refused, accepted, ignored, crashed, undecided
    accepted: int = 0
    ignored: int = 0
    crashed: int = 0  # the server process exited (it is restarted to go on)
    unknown_internal: int = 0  # UNKNOWN or INTERNAL answers, during and after the offers
    queries: int = 0
    codes: Counter[str] = field(default_factory=Counter)  # status code name -> answers
    lost_good: int = 0  # offers after which the last good version was not served
    unlogged: int = 0  # refused offers whose log line names neither a file of the version nor what is wrong
    undecided: int = 0  # no decision within DECIDE_S
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)  # "<kind>:<file>/<damage>" -> outcome -> offers
    refusals: Counter[str] = field(default_factory=Counter)  # what stopped the refused offers (REFUSALS)
    decide_seconds: list[float] = field(default_factory=list)  # CURRENT written -> the server's decision
    rss_kib: tuple[int, int] = (0, 0)  # the server's resident memory at the first and the last offer
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


# ---- damage ---------------------------------------------------------------------------------------
def _bit_flips(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 8, 64))):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.choice((0, 1, 8, rng.randrange(len(data)), len(data) - 1))]


def _zero_range(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.choice((4, 64, 4096, len(data))))
    return data[:start] + bytes(end - start) + data[end:]


def _huge_count(data: bytes, rng: random.Random) -> bytes:
    """Overwrite a small positive integer (a count or a size, most likely) with a huge one."""
    if data.startswith(b"\x93NUMPY"):  # the .npy header is text: "'shape': (120, 64)"
        head = data[:256].decode("latin-1")
        start = head.index("(") + 1
        return data[:start] + str(rng.choice(HUGE)).encode() + data[start + head[start:].index(","):]
    width = rng.choice((4, 8))
    limit = len(data) - width
    candidates = [i for i in range(0, min(limit, 8192)) if 0 < int.from_bytes(data[i:i + width], "little") < 10**7]
    at = rng.choice(candidates) if candidates else rng.randrange(max(1, limit))
    value = rng.choice(HUGE) % (1 << (8 * width))
    return data[:at] + value.to_bytes(width, "little") + data[at + width:]


def _random_bytes(data: bytes, rng: random.Random) -> bytes:
    size = rng.choice((len(data), 16, 4096, 2 * len(data)))
    head = data[:rng.choice((0, 4, 8))]  # keep the magic sometimes, so the reader goes further
    return head + rng.randbytes(max(0, size - len(head)))


def _append(data: bytes, rng: random.Random) -> bytes:
    return data + rng.randbytes(rng.choice((1, 8, 4096)))


BYTE_DAMAGE: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "bit_flips": _bit_flips, "truncate": _truncate, "zero_range": _zero_range, "huge_count": _huge_count,
    "random_bytes": _random_bytes, "append": _append}
FILE_DAMAGE = ("swap_files", "donor_file", "delete")
MANIFEST_EDITS = ("count", "dim", "kind", "files", "model_version", "index_version", "types")


def _edit_manifest(data: dict[str, object], rng: random.Random) -> str:
    """Edit one field of a parsed manifest (rehashed afterwards, so the edit is what the reader meets)."""
    edit = rng.choice(MANIFEST_EDITS)
    if edit == "count":
        data["count"] = rng.choice((0, -1, int(str(data["count"])) + 1, 2**62))
    elif edit == "dim":
        data["dim"] = rng.choice((0, -5, int(str(data["dim"])) * 2, 2**40))
    elif edit == "kind":
        data["kind"] = rng.choice(("flat", "hnsw", "ivfpq", "lsh", ""))
    elif edit == "files":
        files = dict(data["files"])  # type: ignore[call-overload]
        files.pop(rng.choice(DATA_FILES))
        data["files"] = files
    elif edit == "model_version":
        data["model_version"] = "another-model"
    elif edit == "index_version":
        data["index_version"] = rng.choice(("", "../../etc", "x" * 5000))
    else:
        key = rng.choice(("count", "dim", "params", "files"))
        data[key] = rng.choice(("12", None, [1, 2], {"a": 1}, 1.5))
    return edit


def manifest_checksum(body: dict[str, object]) -> str:
    """The manifest's own checksum, computed as `index.publish.Manifest.to_json` does."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def rehash(directory: Path, edit: Callable[[dict[str, object]], object] | None = None) -> bool:
    """Rewrite the manifest with the sha256 of the files as they are now (a buggy writer's manifest),
    after `edit`; False when the manifest does not parse as a JSON object."""
    try:
        data = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    data.pop(MANIFEST_CHECKSUM, None)
    data["index_version"] = directory.name
    data["files"] = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
                     for name in DATA_FILES if (directory / name).is_file()}
    if edit is not None:
        edit(data)
    data[MANIFEST_CHECKSUM] = manifest_checksum(data)
    (directory / MANIFEST_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return True


def damage(directory: Path, donors: list[Path], rng: random.Random, rehashed: bool) -> str:
    """Damage one file of the version copy `directory` (then rehash its manifest when `rehashed`);
    returns "<file>/<damage>". `donors`: other sound versions whose files may be swapped in."""
    target = rng.choices([t for t, _ in TARGETS], [w for _, w in TARGETS])[0]
    path = directory / target
    if target == MANIFEST_FILE and rehashed:
        edits: list[str] = []
        rehash(directory, lambda data: edits.append(_edit_manifest(data, rng)))
        return f"{target}/edit_{edits[0]}"
    how = rng.choice([*BYTE_DAMAGE, *FILE_DAMAGE] if target != MANIFEST_FILE else [*BYTE_DAMAGE, "delete"])
    if how == "swap_files":
        other = directory / rng.choice([n for n in DATA_FILES if n != target])
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
        how = f"swap_with_{other.name}"
    elif how == "donor_file":  # a file of another version that differs (the HNSW one shares ids and vectors)
        before = path.read_bytes()
        options = [d / n for d in donors for n in DATA_FILES if (d / n).read_bytes() != before]
        shutil.copyfile(rng.choice(options), path)
        how = "from_another_version"
    elif how == "delete":
        path.unlink()
    else:
        before = path.read_bytes()
        after = BYTE_DAMAGE[how](before, rng)
        while after == before:  # a no-op draw (zeros over zeros): draw again
            after = BYTE_DAMAGE[how](before, rng)
        path.write_bytes(after)
    if rehashed and target != MANIFEST_FILE:
        rehash(directory)
    return f"{target}/{how}"


# ---- the sound versions the offers start from -------------------------------------------------------
def make_bases(served_root: Path, work: Path) -> dict[str, Path]:
    """The served flat version, and HNSW and IVF-PQ versions of the same model published in a root of
    their own (beside the served root they would be the newest versions a fallback could pick)."""
    good = load_version(served_root)
    source = work / "bases"
    shutil.rmtree(source, ignore_errors=True)
    manifest = good.manifest
    vectors = np.asarray(good.vectors)
    hnsw = publish_index(source, vectors, good.ids, IndexConfig(kind="hnsw", threads=1), manifest.model_name,
                         manifest.model_version, make_current=False)
    rng = np.random.default_rng(0)
    extra = rng.standard_normal((IVFPQ_ITEMS, vectors.shape[1])).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    ids = IdMap([f"pq-{i}" for i in range(IVFPQ_ITEMS)], [f"h{i}" for i in range(IVFPQ_ITEMS)],
                [{} for _ in range(IVFPQ_ITEMS)])
    with _silenced():  # FAISS's k-means prints a warning per codebook trained on fewer than 9,984 points
        ivfpq = publish_index(source, extra, ids, IndexConfig(kind="ivfpq", pq_m=8, nprobe=8, threads=1), manifest.model_name,
                              manifest.model_version, make_current=False)
    return {"flat": good.path, "hnsw": hnsw.path, "ivfpq": ivfpq.path}


@contextmanager
def _silenced() -> Iterator[None]:
    """Send this process's stdout and stderr file descriptors (C libraries print there) to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


# ---- querying -----------------------------------------------------------------------------------------
class Asker:
    """Queries of every read RPC against the server, counting status codes."""

    def __init__(self, result: MutatedFilesResult, item_ids: list[str], dim: int, seed: int) -> None:
        self.result, self.item_ids, self.dim = result, item_ids, dim
        self.rng = random.Random(seed)
        self.client: Client | None = None

    def connect(self, target: str) -> None:
        if self.client is not None:
            self.client.close()
        self.client = Client(target, timeout=RPC_TIMEOUT_S)

    def ask(self, where: str) -> None:
        assert self.client is not None
        stub, rng = self.client.stub, self.rng
        ids = rng.sample(self.item_ids, 3)
        vec = np.random.default_rng(rng.randrange(2**32)).standard_normal(self.dim).tolist()
        calls: list[tuple[str, Callable[[], object]]] = [
            ("SimilarItems(id)", lambda: stub.SimilarItems(pb.SimilarItemsRequest(
                queries=[pb.Query(item_id=ids[0])], k=10), timeout=RPC_TIMEOUT_S)),
            ("SimilarItems(vector)", lambda: stub.SimilarItems(pb.SimilarItemsRequest(
                queries=[pb.Query(vector=pb.Vector(values=vec))], k=5, exclude_item_ids=ids[1:]),
                timeout=RPC_TIMEOUT_S)),
            ("GetEmbeddings", lambda: stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=ids), timeout=RPC_TIMEOUT_S)),
            ("RecommendForUser", lambda: stub.RecommendForUser(pb.RecommendForUserRequest(
                history=[pb.HistoryEvent(item_id=i) for i in ids], k=10), timeout=RPC_TIMEOUT_S)),
            ("GetInfo", lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=RPC_TIMEOUT_S)),
        ]
        name, call = rng.choice(calls)
        try:
            call()
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            if code in BAD:
                self.result.unknown_internal += 1
                self.result.failures.append(f"{where}: {name} answered {code.name}: {e.details()}")
        self.result.queries += 1
        self.result.codes[code.name] += 1

    def served(self) -> str | None:
        assert self.client is not None
        try:
            return str(self.client.info().index_version)
        except grpc.RpcError:
            return None


# ---- the run --------------------------------------------------------------------------------------------
def _model_of(directory: Path) -> object:
    try:
        return json.loads((directory / MANIFEST_FILE).read_text()).get("model_version")
    except (OSError, ValueError, AttributeError):
        return None


def _log_since(log: Path, offset: int) -> str:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


REFUSALS = (("does not match its sha256", "checksum"), ("killed a probe process", "probe: the reader died"),
            ("bytes of memory", "probe: memory limit"), ("not read within", "probe: timeout"),
            ("could not be read", "probe: reader error"), ("unreadable manifest", "manifest unreadable"),
            ("is missing", "file missing"), ("does not list", "manifest lacks a file"))


def _refusal(line: str) -> str:
    """What stopped an offer, from the server's log line (REFUSALS; else one of the probe's content checks)."""
    return next((kind for text, kind in REFUSALS if text in line), "probe: content check")


def _point_current_at(root: Path, name: str) -> None:
    if (root / VERSIONS / name / MANIFEST_FILE).is_file():
        set_current(root, name)
    else:  # set_current refuses a version without a manifest: point at it as a buggy tool would
        (root / ".CURRENT.tmp").write_text(name + "\n")
        os.replace(root / ".CURRENT.tmp", root / CURRENT)


def _decide(proc: ServeProc, name: str, offset: int, another_model: bool, asker: Asker,
            label: str) -> tuple[str, list[str]]:
    """Query until the server refuses `name` (a log line says so), serves it, or (a version of another
    model) leaves it alone; returns the outcome and the log lines that name the version."""
    started = time.monotonic()
    while time.monotonic() - started < DECIDE_S:
        if not proc.alive():
            return "crashed", []
        asker.ask(label)
        said = [line for line in _log_since(proc.log, offset).splitlines()
                if f"refusing index version {name}" in line or f"skipping index version {name}" in line]
        if said:
            return "refused", said
        if asker.served() == name:
            return "accepted", []
        if another_model and time.monotonic() - started > IGNORE_AFTER_S:
            return "ignored", []
        time.sleep(POLL_SECONDS / 2)
    return "undecided", []


def _offer(i: int, seed: int, proc: ServeProc, root: Path, bases: dict[str, Path], good: str, asker: Asker,
           result: MutatedFilesResult) -> None:
    """Offer `i`: a damaged copy of a base version made CURRENT, the server's decision, CURRENT back to good."""
    rng = random.Random(f"{seed}-{i}")
    kind = "flat" if i % 2 == 0 else rng.choice(sorted(bases))  # half of them the served kind
    rehashed = rng.random() < 0.5
    name = new_version_name(proc.world.model_version)
    directory = root / VERSIONS / name
    shutil.copytree(bases[kind], directory)
    what = f"{kind}:{damage(directory, [p for k, p in bases.items() if k != kind], rng, rehashed)}"
    label = f"offer {i} ({what}{', rehashed' if rehashed else ''})"
    result.offered += 1
    result.rehashed += rehashed
    offset = proc.log.stat().st_size
    _point_current_at(root, name)
    started = time.monotonic()
    outcome, said = _decide(proc, name, offset, _model_of(directory) not in (None, proc.world.model_version),
                            asker, label)
    result.decide_seconds.append(time.monotonic() - started)
    result.outcomes.setdefault(what, Counter())[outcome] += 1
    set_current(root, good)
    setattr(result, outcome, getattr(result, outcome) + 1)
    if outcome == "crashed":
        result.failures.append(f"{label}: the server exited ({proc.proc.returncode if proc.proc else '?'}): "
                               f"{_log_since(proc.log, offset)[-1500:]}")
        proc.start()
        asker.connect(proc.target)
    elif outcome == "undecided":
        result.failures.append(f"{label}: no decision in {DECIDE_S:.0f}s: {_log_since(proc.log, offset)[-800:]}")
    elif outcome == "refused":
        result.refusals[_refusal(said[-1])] += 1
    if outcome == "refused" and not any(f"{name}/" in line or f"{VERSIONS}/{name}:" in line for line in said):
        result.unlogged += 1  # the line names the version but neither a file of it nor what is wrong with it
        result.failures.append(f"{label}: refused without naming a file: {said[-1][:300]}")
    for _ in range(2):  # after the offer: still answering, on the last good version
        asker.ask(label + " after")
    deadline = time.monotonic() + DECIDE_S
    while outcome == "accepted" and asker.served() != good and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    served = asker.served()
    if served != good:
        result.lost_good += 1
        result.failures.append(f"{label}: serves {served} after the offer, not the last good {good}")
    shutil.rmtree(directory)


def run_mutated_files(world: World, work: Path, count: int, seed: int) -> MutatedFilesResult:
    """Offer `count` damaged versions to one running server, one at a time (see the module doc)."""
    quiet_env()
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    root = fresh_root(world, work / "root")
    good = read_current(root)
    assert good is not None
    bases = make_bases(root, work)
    published = load_version(root, good)
    result = MutatedFilesResult()
    proc = ServeProc(world, root, work / "serve.log", poll_seconds=POLL_SECONDS, extra=("--log-format", "json"))
    proc.start()
    asker = Asker(result, list(published.ids.item_ids), published.manifest.dim, seed)
    asker.connect(proc.target)
    rss_start = proc.rss_kib()
    try:
        for i in range(count):
            _offer(i, seed, proc, root, bases, good, asker, result)
        result.rss_kib = (rss_start, proc.rss_kib() if proc.alive() else 0)
        if proc.alive() and asker.client is not None and asker.client.health_status() != "SERVING":
            result.failures.append("health is not SERVING after the offers")
    finally:
        if asker.client is not None:
            asker.client.close()
        proc.stop()
    result.seconds = time.monotonic() - started
    return result
