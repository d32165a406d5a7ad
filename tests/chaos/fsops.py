"""Small file helpers for the chaos tests (written here so a test says whether it fsyncs)."""

from __future__ import annotations

import os
from pathlib import Path


def write_file(path: Path, data: bytes, fsync: bool) -> None:
    """Create or replace `path`'s content with `data`; fsync the file (not its folder) when asked."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
