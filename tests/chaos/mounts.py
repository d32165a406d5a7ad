"""The pytest side of the lost-write filesystem: a fixture that mounts one, or skips (fails under CI=true)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.lostfs import LostMount, prerequisites


def require_lostfs() -> None:
    """Skip when FUSE cannot be mounted here; under CI=true a missing prerequisite fails instead."""
    why = prerequisites()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"lost-write filesystem unavailable: {why}; `make test` installs fuse3 and mfusepy as root")
    pytest.skip(f"lost-write filesystem unavailable: {why}")


@pytest.fixture
def lostfs(tmp_path: Path) -> Iterator[LostMount]:
    """A lost-write filesystem at tmp_path/mnt over tmp_path/disk; unmounted (cleanly) afterwards."""
    require_lostfs()
    mount = LostMount(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lostfs")
    mount.mount()
    try:
        yield mount
    finally:
        if mount.proc is not None:
            mount.unmount(lazy=True)  # a failed test's traceback may still hold a memory map
