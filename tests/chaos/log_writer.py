"""A process that writes a stream of upserts and deletes into a `WriteLog`, for power-cut tests.

``python -m tests.chaos.log_writer LOG SEED IDS [COMPACT_EVERY]``: before each append it prints
``try <json>`` (the batch: item id -> content hash, or null for a delete), after the append returns
(fsync'd: acknowledged) it prints ``ack``; every COMPACT_EVERY appends it compacts the log (and prints
``compacted`` when that freed bytes). It runs
until it is killed.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np

from index.log import LogRecord, WriteLog


def record(item_id: str, content_hash: str | None) -> LogRecord:
    if content_hash is None:
        return LogRecord(op="delete", item_id=item_id)
    vector = np.frombuffer(hashlib.sha256(content_hash.encode()).digest(), dtype=np.uint8)[:8].astype(np.float32)
    return LogRecord(op="upsert", item_id=item_id, model_version="1", vector=vector / np.linalg.norm(vector),
                     content={"title": f"{item_id} {content_hash} " + "x" * 400}, content_hash=content_hash)


def main(argv: list[str]) -> None:
    path, seed, ids = Path(argv[0]), int(argv[1]), int(argv[2])
    compact_every = int(argv[3]) if len(argv) > 3 else 0
    rng = random.Random(seed)
    log = WriteLog(path)
    n = 0
    while True:
        batch = {f"item-{rng.randrange(ids)}": (None if rng.random() < 0.3 else f"{seed}-{n}-{j}")
                 for j in range(rng.randint(1, 3))}
        print("try", json.dumps(batch), flush=True)
        log.append(record(i, h) for i, h in batch.items())
        print("ack", flush=True)
        n += 1
        if compact_every and n % compact_every == 0 and log.compact():
            print("compacted", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
