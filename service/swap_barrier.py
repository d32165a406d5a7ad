"""One swap for a whole `serve --processes N` group: members load a new pair on their own, swap together.

Each member's watcher finds and loads a new model/index pair when it polls, so on their own the members
would swap up to a poll interval plus a load apart, and consecutive calls landing on different members
would flip between two model versions. With a barrier, a member that has loaded (staged) a pair says so
in its slot file under the group's folder and keeps serving the old pair until every member's file names
the new one; each then swaps within `POLL_S` of the last one to stage it.

It never holds the group back for long: past `WAIT_S` (a member that cannot load the pair: refused,
out of memory, restarting) a member swaps alone, with a warning. A member that sees another stage a
different pair after it staged its own (a newer publication) gives up its staged pair and loads again
at its next poll, so two publications in quick succession converge on the newer one. A member that sees
another stage a pair it does not serve polls at once (`news`, every `WAKE_S`), so the group swaps about one
load after the first member's poll, not one poll interval later. A member restarted into a running group
that follows the registry (another slot already names a pair; `--poll-seconds` > 0) goes through the
barrier with its first pair too, before it listens: if a pair was published while it was down, the others
load it and the group swaps to it together, rather than the restarted member serving it a load ahead.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

Pair = tuple[str, str]  # (model version, index version)
WAIT_S = 120.0  # longest a staged pair waits for the other members
POLL_S = 0.02  # how often a waiting member reads the others' slot files
WAKE_S = 0.25  # how often an idle member looks for a pair another member staged (then polls at once)


class SwapBarrier:
    """Member `slot` of `members`, agreeing on swaps through the slot files in `directory`."""

    def __init__(self, directory: Path, slot: int, members: int, wait_s: float = WAIT_S,
                 poll_s: float = POLL_S) -> None:
        if not 0 <= slot < members:
            raise ValueError(f"slot={slot} must be in [0, members={members})")
        self.directory, self.slot, self.members = directory, slot, members
        self.wait_s, self.poll_s = wait_s, poll_s
        self._seen: dict[int, int] = {}  # slot -> time of its announcement `news` last looked at

    def news(self, served: Pair | None) -> bool:
        """Whether another member announced, since the last look, a pair this one does not serve: its
        watcher should poll now rather than at its next interval (the others load the pair meanwhile)."""
        fresh = False
        for s, (pair, ns) in self._read().items():
            if s != self.slot and ns > self._seen.get(s, 0):
                self._seen[s] = ns
                fresh = fresh or pair != served
        return fresh

    def group_running(self) -> bool:
        """Whether another member has announced a pair: this one joins a running group (a restart), not
        one starting with it."""
        return any(s != self.slot for s in self._read())

    def announce(self, pair: Pair) -> int:
        """Say that this member serves or has staged `pair` (an atomic replace of its slot file); returns
        the announcement's time (ns since the epoch)."""
        path = self.directory / f"slot-{self.slot}"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        ns = time.time_ns()
        tmp.write_text(json.dumps({"pair": list(pair), "ns": ns}))
        os.replace(tmp, path)
        return ns

    def agree(self, pair: Pair, stop: Callable[[], bool] = lambda: False) -> bool:
        """Announce `pair` as staged and wait until every member names it.

        Returns:
            True: swap now (all agree, or `wait_s` passed: logged); False: another member staged a
            different pair after this one did (a newer publication), or `stop()` became true.
        """
        mine = self.announce(pair)
        deadline = time.monotonic() + self.wait_s
        while True:
            others = self._read()
            if all(others.get(s, (None, 0))[0] == pair for s in range(self.members)):
                return True
            if any(p != pair and ns > mine for s, (p, ns) in others.items() if s != self.slot):
                logger.info("process group: another member staged a newer pair than %s %s; loading again",
                            *pair)
                return False
            if stop():
                return False
            if time.monotonic() > deadline:
                behind = sorted(s for s in range(self.members) if others.get(s, (None, 0))[0] != pair)
                logger.warning("process group: members %s have not loaded model %s with index %s after %.0fs; "
                               "swapping without them", behind, *pair, self.wait_s,
                               extra={"event": "swap_without_agreement"})
                return True
            time.sleep(self.poll_s)

    def _read(self) -> dict[int, tuple[Pair | None, int]]:
        out: dict[int, tuple[Pair | None, int]] = {}
        for s in range(self.members):
            try:
                body = json.loads((self.directory / f"slot-{s}").read_text())
                out[s] = (tuple(body["pair"]), int(body["ns"]))  # type: ignore[assignment]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not written yet, or being replaced: read again at the next look
        return out
