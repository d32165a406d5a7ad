"""Generated requests over the whole public contract against a running `onetower serve` (issue 19:
">= 10,000 generated requests over the contract").

Every RPC of `onetower.v1.Recommendations`, with valid and invalid fields drawn together: item ids
(catalog ids, unknown, unicode, control and zero-width characters, 256+ bytes, empty), k of 0, -1 and
2^31-1, NaN/inf/zero/huge/wrong-length vectors, empty and over-limit lists, images that are garbage,
truncated, valid, or headers claiming huge sizes, bad timestamps, weights and score floors, search
params out of range; and raw bytes sent through a generic `channel.unary_unary` with identity
serializers (random bytes, valid messages truncated or bit-flipped, invalid UTF-8 in string fields,
deeply nested unknown groups, another RPC's message, unknown methods).

Counted per RPC and status code. Failures: UNKNOWN or INTERNAL answers, server crashes (the process
exited; it is restarted to go on), health not SERVING at the end. Request `i` is drawn from
`random.Random(f"{seed}-{i}")`: `python -m tests.chaos.requests_fuzz --seed S --show I` prints it.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message
from PIL import Image

from index.publish import load_version
from protos.onetower.v1 import onetower_pb2 as pb
from tests.chaos.world import ServeProc, World, fresh_root, quiet_env
from tests.integration.crash_util import tail

SERVICE = pb.DESCRIPTOR.services_by_name["Recommendations"]
METHODS = [m.name for m in SERVICE.methods]
RPC_TIMEOUT_S = 30.0
RAW_SHARE = 0.15  # requests sent as raw bytes
BAD = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
SHOWN = 2000  # characters of a failing request kept for the report
SHOW_FAILING = 20  # failing requests kept for the report
INT32 = (0, 1, -1, 5, 10, 1000, 1001, 2**31 - 1, -(2**31))
FLOATS = (0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, -1e-45, 3.4e38, -3.4e38, math.nan, math.inf, -math.inf)
WORDS = ("red", "leather", "bag", "watch", "shoe", "linen", "shirt", "lamp", "Zorvane", "日本", "ąčĘ", "🙂")
ODD_CHARS = "\x00\x01\x1f\x7f\u0085\u00a0\u200b\u200d\u202e\u2028\u2029\ufeff\ufffd\ue000\U0001f600\u0301" \
            "日本語ąčĘ \t\n\r\\\"'%s{}<>/"


@dataclass
class RequestsFuzzResult:
    """What `run_requests_fuzz` counted."""

    requests: int = 0
    raw: int = 0  # of them sent as raw bytes
    codes: Counter[str] = field(default_factory=Counter)  # status code name -> answers
    per_rpc: dict[str, Counter[str]] = field(default_factory=dict)  # method -> status code name -> answers
    unknown_internal: int = 0
    crashes: int = 0
    health_serving: bool = False  # at the end
    failing: list[str] = field(default_factory=list)  # the first failing requests, reproducible by index
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


# ---- the pieces of a request ---------------------------------------------------------------------
def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


N_VALID_IMAGES = 4  # the first samples: one small valid image per format


def _image_samples() -> list[bytes]:
    """Valid images of each format (N_VALID_IMAGES), then bytes that only look like one."""
    out = []
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        buf = io.BytesIO()
        Image.new("RGB", (24, 16), (10, 200, 40)).save(buf, format=fmt)
        out.append(buf.getvalue())
    png = out[0]
    huge_header = png[:16] + struct.pack(">II", 60000, 60000) + png[24:]  # IHDR claims 3.6 gigapixels
    wide = png[:16] + struct.pack(">II", 1, 2**31 - 1) + png[24:]
    out += [png[:30], png[:8], huge_header, wide, b"\xff\xd8\xff", b"GIF89a" + bytes(20), b"RIFF\x00\x00\x00\x00WEBP",
            b"", b"\x00" * 100, _png(2000, 2000)]
    return out


class Draw:
    """Draws the fields of one request from one seeded generator: each field is sound, or with the
    request's `p_bad` chance one of the values the contract refuses (or a legal oddity)."""

    def __init__(self, rng: random.Random, item_ids: list[str], dim: int, model_version: str,
                 images: list[bytes]) -> None:
        self.rng, self.item_ids, self.dim, self.model_version, self.images = rng, item_ids, dim, model_version, images
        self.p_bad = rng.choice((0.0, 0.0, 0.03, 0.1, 0.3))  # a third of the requests are sound throughout

    def bad(self) -> bool:
        return self.rng.random() < self.p_bad

    def text(self, limit: int = 40) -> str:
        rng = self.rng
        if self.bad():
            pool = rng.choice((ODD_CHARS, "日本語ąčĘ", "a"))
            return "".join(rng.choice(pool) for _ in range(rng.choice((0, 1, limit, limit * 10))))
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))

    def item_id(self) -> str:
        rng = self.rng
        if self.bad():
            return rng.choice(("", " ", "x" * 256, "x" * 257, "é" * 128, "é" * 129, "x" * 100_000, "\U0001f600" * 64,
                               "a\x00b", "\u202eevil", "zero\u200bwidth", "line\u2028sep", "\ue000", "tab\tid"))
        if rng.random() < 0.7:
            return rng.choice(self.item_ids)
        return rng.choice(("fz-", "日本-", "ß-", "id with spaces-")) + str(rng.randrange(1000))

    def count(self, usual: int = 3) -> int:
        return self.rng.choice((0, 257, 1001, 5000)) if self.bad() else self.rng.randint(1, usual)

    def ids(self, allow_empty: bool = False) -> list[str]:
        n = 0 if allow_empty and self.rng.random() < 0.5 else self.count()
        return [self.item_id() for _ in range(n)]

    def k(self) -> int:
        return self.rng.choice(INT32) if self.bad() else self.rng.choice((1, 5, 10, 50, 1000))

    def value(self) -> float:
        return self.rng.choice(FLOATS) if self.bad() else self.rng.gauss(0, 1)

    def vector(self) -> pb.Vector:
        rng = self.rng
        size = rng.choice((0, 1, self.dim - 1, self.dim + 1, 100_000)) if self.bad() else self.dim
        if self.bad():
            return pb.Vector(values=[rng.choice((0.0, 1e-45, 3.4e38))] * size)
        return pb.Vector(values=[self.value() for _ in range(size)])

    def images_of_item(self) -> list[bytes]:
        rng = self.rng
        if self.bad():
            return [rng.choice(self.images) for _ in range(rng.choice((1, 2, 9)))]
        return [rng.choice(self.images[:N_VALID_IMAGES]) for _ in range(rng.choice((0, 0, 1, 2)))]

    def item(self, need_id: bool) -> pb.Item:
        rng = self.rng
        item = pb.Item(item_id=self.item_id() if need_id or self.bad() else "", title=self.text(),
                       description=self.text(200) if rng.random() < 0.3 else "", images=self.images_of_item())
        for _ in range(rng.choice((0, 1, 2))):
            item.attributes[rng.choice(("category", "colour")) if not self.bad() else self.text(10)] = self.text(10)
        if self.bad():
            rng.choice((lambda: item.ClearField("title"), lambda: setattr(item, "description", "d" * 30_000)))()
        return item

    def items(self, need_id: bool) -> list[pb.Item]:
        return [self.item(need_id) for _ in range(self.count())]

    def search(self) -> pb.SearchParams:
        rng = self.rng
        if self.bad():
            return pb.SearchParams(ef_search=rng.choice((*INT32, 4096, 4097)), nprobe=rng.choice((*INT32, 65536, 65537)))
        return pb.SearchParams(ef_search=rng.choice((0, 0, 16, 256)), nprobe=rng.choice((0, 0, 1, 64)))

    def filter(self) -> pb.Filter:
        f = pb.Filter()
        for _ in range(self.rng.choice((0, 0, 0, 1, 2))):
            key = self.text(8) if self.bad() else "category"
            f.attributes_equal[key] = self.text(8) if self.bad() else self.rng.choice(("watch", "shoe", "bag"))
        return f

    def event(self) -> pb.HistoryEvent:
        rng = self.rng
        event = pb.HistoryEvent(item_id=self.item_id())
        if rng.random() < 0.5:
            event.weight = rng.choice(FLOATS) if self.bad() else rng.choice((0.0, 0.5, 1.0, 3.0))
        now = int(time.time() * 1000)
        event.timestamp_ms = rng.choice((-1, 2**63 - 1, -(2**63), 1)) if self.bad() else \
            rng.choice((0, now, now - 86_400_000 * rng.randint(1, 400), now + 10**9))
        return event

    def min_score(self, request: pb.SimilarItemsRequest) -> None:
        if self.rng.random() < 0.4:
            request.min_score = self.rng.choice(FLOATS) if self.bad() else self.rng.uniform(-1, 1)

    def model(self) -> str:
        return self.text() if self.bad() else self.rng.choice(("", self.model_version))


def typed_request(method: str, d: Draw) -> Message:
    """A request message for `method` with valid and invalid fields mixed."""
    rng = d.rng
    if method == "EmbedItems":
        return pb.EmbedItemsRequest(items=d.items(need_id=False))
    if method == "UpsertItems":
        return pb.UpsertItemsRequest(items=d.items(need_id=True), neighbors_k=d.k() if rng.random() < 0.5 else 0)
    if method == "DeleteItems":  # catalog ids rarely: the catalog should outlive the run
        return pb.DeleteItemsRequest(item_ids=[i for i in d.ids() if i not in d.item_ids or rng.random() < 0.05])
    if method == "SimilarItems":
        queries = []
        for _ in range(d.count()):
            which = rng.choice(("item_id", "vector", "item", "none" if d.bad() else "item_id"))
            queries.append(pb.Query(item_id=d.item_id()) if which == "item_id" else
                           pb.Query(vector=d.vector()) if which == "vector" else
                           pb.Query(item=d.item(need_id=False)) if which == "item" else pb.Query())
        request = pb.SimilarItemsRequest(queries=queries, k=d.k(), exclude_item_ids=d.ids(allow_empty=True),
                                         filter=d.filter(), search=d.search(), model_version=d.model())
        d.min_score(request)
        return request
    if method == "RecommendForUser":
        return pb.RecommendForUserRequest(history=[d.event() for _ in range(d.count(8))], k=d.k(),
                                          exclude_item_ids=d.ids(allow_empty=True), filter=d.filter(),
                                          search=d.search())
    if method == "GetEmbeddings":
        return pb.GetEmbeddingsRequest(item_ids=d.ids())
    if method == "GetInfo":
        return pb.GetInfoRequest()
    if method == "GetLiveItems":
        return pb.GetLiveItemsRequest(item_ids=d.ids())
    raise ValueError(f"unknown method {method!r}")


def _nested_groups(depth: int) -> bytes:
    return b"\x1b" * depth + b"\x1c" * depth  # field 3, start group / end group


def raw_request(method: str, d: Draw) -> bytes:
    """Bytes for `method` that a client stub would never send."""
    rng = d.rng
    how = rng.choice(("random", "truncated", "flipped", "bad_utf8", "groups", "other_message", "huge_length"))
    if how == "random":
        return rng.randbytes(rng.choice((0, 1, 7, 300, 70_000)))
    valid = typed_request(method, d).SerializeToString()
    if how == "truncated" and valid:
        return valid[: rng.randrange(len(valid))]
    if how == "flipped" and valid:
        out = bytearray(valid)
        for _ in range(rng.choice((1, 3, 20))):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if how == "bad_utf8":  # field 1 (a string or an Item in every request but GetInfo's) holding invalid UTF-8
        junk = rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"))
        return bytes([0x0A, len(junk)]) + junk
    if how == "groups":
        return _nested_groups(rng.choice((10, 100, 10_000)))
    if how == "other_message":
        return typed_request(rng.choice(METHODS), d).SerializeToString()
    return b"\x0a\xff\xff\xff\xff\x0f" + rng.randbytes(10)  # a length prefix of 4 GB over 10 bytes


def draw_request(seed: int, i: int, item_ids: list[str], dim: int, model_version: str,
                 images: list[bytes]) -> tuple[str, Message | bytes]:
    """Request `i` of a run: (method path, message or raw bytes)."""
    rng = random.Random(f"{seed}-{i}")
    d = Draw(rng, item_ids, dim, model_version, images)
    method = rng.choice(METHODS)
    if rng.random() < RAW_SHARE:
        if rng.random() < 0.05:
            return f"/{SERVICE.full_name}/{rng.choice(('Nope', 'embeditems', ''))}", rng.randbytes(8)
        return f"/{SERVICE.full_name}/{method}", raw_request(method, d)
    return f"/{SERVICE.full_name}/{method}", typed_request(method, d)


def describe(request: Message | bytes) -> str:
    if isinstance(request, bytes):
        return f"raw {len(request)} bytes: {request[:200]!r}"
    return f"{type(request).__name__} {text_format.MessageToString(request, as_one_line=True)[:SHOWN]}"


# ---- the run --------------------------------------------------------------------------------------
class Sender:
    """Sends typed or raw requests on one channel, by method path."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 256 << 20)])
        self._calls: dict[str, Callable[..., Any]] = {}

    def send(self, path: str, request: Message | bytes) -> grpc.StatusCode:
        data = request if isinstance(request, bytes) else request.SerializeToString()
        call = self._calls.setdefault(path, self.channel.unary_unary(path))  # identity serializers: bytes as given
        try:
            call(data, timeout=RPC_TIMEOUT_S)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]

    def health(self) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            resp = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
        except grpc.RpcError as e:
            return e.code().name

    def close(self) -> None:
        self.channel.close()


def run_requests_fuzz(world: World, work: Path, count: int, seed: int, concurrency: int = 1) -> RequestsFuzzResult:
    """Send `count` generated requests to one server (restarted if it dies), `concurrency` at a time
    (1: one after another, so a failing request's server state is that of a replay too)."""
    quiet_env()
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    root = fresh_root(world, work / "root")
    published = load_version(root)
    item_ids, dim = list(published.ids.item_ids), published.manifest.dim
    images = _image_samples()
    result = RequestsFuzzResult()
    proc = ServeProc(world, root, work / "serve.log", extra=("--log-format", "json"))
    proc.start()
    sender = Sender(proc.target)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fuzz")
    try:
        for first in range(0, count, concurrency):
            batch = [(i, *draw_request(seed, i, item_ids, dim, world.model_version, images))
                     for i in range(first, min(count, first + concurrency))]
            codes = list(pool.map(sender.send, [path for _, path, _ in batch], [req for _, _, req in batch]))
            for (i, path, request), code in zip(batch, codes, strict=True):
                _count(result, seed, i, path, request, code)
            if grpc.StatusCode.UNAVAILABLE in codes and not proc.alive():
                result.crashes += 1
                result.failures.append(f"requests {batch[0][0]}..{batch[-1][0]} (seed {seed}): the server exited "
                                       f"({proc.proc.returncode if proc.proc else '?'}): {tail(proc.log, 1500)}")
                sender.close()
                proc.start()
                sender = Sender(proc.target)
        result.health_serving = sender.health() == "SERVING"
    finally:
        pool.shutdown()
        sender.close()
        proc.stop()
    if not result.health_serving:
        result.failures.append("health is not SERVING after the requests")
    result.failures += result.failing
    result.seconds = time.monotonic() - started
    return result


def _count(result: RequestsFuzzResult, seed: int, i: int, path: str, request: Message | bytes,
           code: grpc.StatusCode) -> None:
    method = path.rsplit("/", 1)[-1]
    result.requests += 1
    result.raw += isinstance(request, bytes)
    result.codes[code.name] += 1
    result.per_rpc.setdefault(method, Counter())[code.name] += 1
    if code in BAD:
        result.unknown_internal += 1
        if len(result.failing) < SHOW_FAILING:
            result.failing.append(f"request {i} (seed {seed}) {method} -> {code.name}: {describe(request)}")


def main(argv: list[str]) -> int:
    """Print request `--show` of a run with `--seed` (item ids and dim of a world under `--world`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--show", type=int, nargs="+", required=True)
    parser.add_argument("--world", type=Path, required=True, help="a make_world base folder")
    args = parser.parse_args(argv)
    published = load_version(args.world / "index")
    model_version = f"local:{args.world / 'encoder'}"
    for i in args.show:
        path, request = draw_request(args.seed, i, list(published.ids.item_ids), published.manifest.dim,
                                     model_version, _image_samples())
        print(f"{i} {path} {describe(request)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
