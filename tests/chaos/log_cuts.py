"""Power cuts of the live-write log under a stream of upserts and deletes (shared by the CI test and
`make chaos`): a real writer process is SIGKILLed at a random moment, the power is cut, the filesystem
remounted, and the log reopened as a restarting server would."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index.log import LOG_FILE, WriteLog
from tests.chaos.lostfs import LostMount

REPO = Path(__file__).resolve().parents[2]
IDS = 40  # items the writers draw from: small, so items are rewritten and deleted often


@dataclass
class LogCutResult:
    cuts: int = 0
    acked: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged writes missing after a restart
    resurrected: list[str] = field(default_factory=list)  # acknowledged deletes that came back
    phantoms: list[str] = field(default_factory=list)  # states nobody wrote
    errors: list[str] = field(default_factory=list)  # the log failed to open
    in_flight: int = 0  # cuts with a write in flight
    compactions: int = 0
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.lost + self.resurrected + self.phantoms + self.errors


def state_of(log_path: Path) -> dict[str, str | None]:
    """item id -> content hash of its newest record (None: deleted), as replay on restart sees it."""
    log = WriteLog(log_path)
    try:
        return {e.item_id: (e.content_hash if e.op == "upsert" else None) for e in log.entries}
    finally:
        log.close()


def run_log_cuts(mount: LostMount, cuts: int, seed: int, acks: tuple[int, int] = (5, 60),
                 compact_every: int = 7, modes: tuple[str, ...] = ("drop", "random")) -> LogCutResult:
    """`cuts` rounds of: writer process -> SIGKILL after a random number of acknowledged appends ->
    power cut -> remount -> check every acknowledged write against the log."""
    rng = random.Random(seed)
    log_path = mount.mountpoint / "index" / LOG_FILE
    expected: dict[str, str | None] = state_of(log_path) if log_path.exists() else {}
    result = LogCutResult()
    for n in range(cuts):
        note = f"cut {n} (seed {seed})"
        errors = mount.workdir / "writer.err"
        writer = subprocess.Popen([sys.executable, "-m", "tests.chaos.log_writer", str(log_path),
                                   str(rng.randrange(2**31)), str(IDS), str(compact_every)],
                                  stdout=subprocess.PIPE, stderr=errors.open("w"), cwd=REPO, text=True)
        assert writer.stdout is not None
        pending: dict[str, str | None] | None = None
        target, acked = rng.randint(*acks), 0
        for line in writer.stdout:
            kind, _, body = line.partition(" ")
            result.compactions += kind.strip() == "compacted"
            if kind == "try":
                pending = json.loads(body)
            elif kind.strip() == "ack" and pending is not None:
                expected.update(pending)
                pending, acked = None, acked + 1
                if acked >= target:
                    break
        if acked < target:
            result.errors.append(f"{note}: writer exited {writer.wait()} after {acked} acks: "
                                 f"{errors.read_text()[-2000:]}")
            return result
        writer.send_signal(signal.SIGKILL)
        rest = writer.stdout.read()  # the same buffered reader: lines it read ahead are in its buffer
        writer.wait(timeout=60)
        for line in rest.splitlines():  # a batch sent after the last ack we counted: in flight at the kill
            kind, _, body = line.partition(" ")
            result.compactions += kind == "compacted"
            if kind == "try":
                pending = json.loads(body)
            elif kind == "ack" and pending is not None:
                expected.update(pending)
                pending, acked = None, acked + 1
        result.acked += acked
        result.in_flight += pending is not None
        result.reports.append(mount.cut(modes[n % len(modes)], seed=rng.randrange(2**31)))
        result.cuts += 1
        try:
            found = state_of(log_path)
        except Exception as e:  # noqa: BLE001 (any failure to reopen is what is counted)
            result.errors.append(f"{note}: the log does not reopen: {type(e).__name__}: {e}")
            return result
        for item in sorted(set(expected) | set(found) | set(pending or {})):
            want, got = expected.get(item, "<never>"), found.get(item, "<never>")
            if got == want or (pending is not None and item in pending and got == pending[item]):
                continue
            line = f"{note}: {item} is {got!r}, acknowledged {want!r}, in flight {(pending or {}).get(item, '-')!r}"
            if want is None and got not in (None, "<never>"):
                result.resurrected.append(line)
            elif got == "<never>" or (want not in (None, "<never>") and got is None):
                result.lost.append(line)
            else:
                result.phantoms.append(line)
        expected = {i: h for i, h in found.items()}
    return result

