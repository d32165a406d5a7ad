"""`make chaos`: the failures of issue 19 at its counts, each counted, with a summary table.

    python -m tests.chaos.run_chaos [--log-cuts 100] [--publish-cuts 50] [--truncate-cuts 50]
        [--write-kills 200] [--reindex-kills 50] [--requests 10000] [--mutations 1000] [--swaps 10]
        [--soak-minutes 20] [--plot docs/reliability-soak.png] [--seed N] [--only PART,...]

Parts: power cuts on the lost-write filesystem (the live-write log under writes, publish, the reindex's
log truncate); SIGKILLs of a real `onetower serve` during mixed upserts and deletes and of a real
`onetower reindex` in each phase; generated requests over the whole contract; mutated index files
offered to a running server; model+index hot swaps under load; a soak of steady mixed traffic.

Each figure is counted, never sampled: acknowledged writes lost, resurrected deletes, states nobody
wrote, roots where CURRENT does not name one verified version, UNKNOWN/INTERNAL answers, server crashes.
Exit code 1 when any of them is not 0. A count of 0 skips that part.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.chaos.lostfs import LostMount, prerequisites
from tests.chaos.world import World, make_world, quiet_env

Row = tuple[str, str, str, str, str]
PARTS = ("cuts", "kills", "requests", "mutations", "swaps", "soak")


def _seconds(t: float) -> str:
    return f"{time.monotonic() - t:.0f} s"


def power_cuts(args: argparse.Namespace, tmp: Path, seed: int) -> tuple[list[Row], list[str]]:
    from tests.chaos.log_cuts import run_log_cuts
    from tests.chaos.publish_cuts import run_publish_cuts, run_truncate_cuts

    rows: list[Row] = []
    failures: list[str] = []
    tmp.mkdir(parents=True, exist_ok=True)
    mount = LostMount(tmp / "disk", tmp / "mnt", tmp / "lostfs")
    mount.mount()
    try:
        t = time.monotonic()
        log = run_log_cuts(mount, args.log_cuts, seed)
        rows.append(("power cuts: live-write log under upserts/deletes (writer SIGKILLed, then cut)", str(log.cuts),
                     f"{log.acked} acked writes, {log.in_flight} cut in flight, {log.compactions} compactions",
                     f"lost {len(log.lost)}, resurrected {len(log.resurrected)}, phantom {len(log.phantoms)}, "
                     f"unreadable {len(log.errors)}", _seconds(t)))
        failures += log.failures
        t = time.monotonic()
        pub = run_publish_cuts(mount, args.publish_cuts, seed)
        rows.append(("power cuts: publish (staging, manifest, rename, CURRENT; prune)", str(pub.cuts),
                     f"{pub.completed} after publish returned", f"not one verified version: {len(pub.failures)}",
                     _seconds(t)))
        failures += pub.failures
        t = time.monotonic()
        trunc = run_truncate_cuts(mount, args.truncate_cuts, seed)
        rows.append(("power cuts: reindex log truncate", str(trunc.cuts), f"{trunc.completed} after it returned",
                     f"log not whole-or-suffix: {len(trunc.failures)}", _seconds(t)))
        failures += trunc.failures
    finally:
        if mount.proc is not None:
            mount.unmount(lazy=True)
    return rows, failures


def kills(args: argparse.Namespace, world: World, tmp: Path, seed: int) -> tuple[list[Row], list[str]]:
    from tests.chaos.serve_kills import run_reindex_kills, run_write_kills

    rows: list[Row] = []
    failures: list[str] = []
    if args.write_kills:
        t = time.monotonic()
        r = run_write_kills(world, tmp / "write-kills", args.write_kills, seed)
        rows.append(("SIGKILL of onetower serve during upserts/deletes (2 writers)", str(r.kills),
                     f"{r.acked} acked writes ({r.acked_deletes} deletes), {r.in_flight} in flight at a kill; "
                     f"restart {_median(r.restart_s):.1f} s median",
                     f"lost {len(r.lost)}, resurrected {len(r.resurrected)}, other {len(r.other)}", _seconds(t)))
        failures += r.failures
    if args.reindex_kills:
        t = time.monotonic()
        r = run_reindex_kills(world, tmp / "reindex-kills", args.reindex_kills, seed + 1)
        rows.append(("SIGKILL of onetower reindex in each phase (server on the same root)", str(r.kills),
                     f"{r.acked} acked writes between runs, {r.completed} runs finished before their pause point",
                     f"lost {len(r.lost)}, resurrected {len(r.resurrected)}, other {len(r.other)}", _seconds(t)))
        failures += r.failures
    return rows, failures


def requests(args: argparse.Namespace, world: World, tmp: Path, seed: int) -> tuple[list[Row], list[str]]:
    from tests.chaos.requests_fuzz import run_requests_fuzz

    t = time.monotonic()
    r = run_requests_fuzz(world, tmp / "requests", args.requests, seed)
    codes = ", ".join(f"{k} {v}" for k, v in sorted(r.codes.items(), key=lambda kv: -kv[1]))
    return [("generated requests over all 8 RPCs (valid, invalid, malformed bytes)", str(r.requests),
             f"{r.raw} as raw bytes; {codes}; health at the end {'SERVING' if r.health_serving else 'NOT SERVING'}",
             f"UNKNOWN/INTERNAL {r.unknown_internal}, crashes {r.crashes}", _seconds(t))], r.failures


def mutations(args: argparse.Namespace, world: World, tmp: Path, seed: int) -> tuple[list[Row], list[str]]:
    from tests.chaos.mutated_files import run_mutated_files

    t = time.monotonic()
    r = run_mutated_files(world, tmp / "mutations", args.mutations, seed)
    why = ", ".join(f"{k} {v}" for k, v in r.refusals.most_common(4))
    return [("mutated index files offered to a running server (flat, HNSW, IVF-PQ)", str(r.offered),
             f"{r.rehashed} with the manifest rehashed; refused {r.refused} ({why}), accepted {r.accepted} "
             f"(harmless damage), ignored {r.ignored} (another model's); RSS {r.rss_kib[0] // 1024} -> "
             f"{r.rss_kib[1] // 1024} MiB",
             f"crashes {r.crashed}, UNKNOWN/INTERNAL {r.unknown_internal}, good version lost {r.lost_good}, "
             f"undecided {r.undecided}, unlogged {r.unlogged}", _seconds(t))], r.failures


def swaps(args: argparse.Namespace, world: World, tmp: Path, seed: int) -> tuple[list[Row], list[str]]:
    from tests.chaos.swaps_soak import run_hot_swaps

    t = time.monotonic()
    r = run_hot_swaps(world, tmp / "swaps", args.swaps, seed)
    codes = ", ".join(f"{k} {v}" for k, v in r.codes.items())
    return [("model+index hot swaps under load (3 searchers, 2 writers)", str(r.swaps),
             f"{codes}; {r.acked} items written; swap {_median(r.swap_s):.2f} s median; search p99 "
             f"before {_median(r.p99_before_ms):.1f} ms, during {_median(r.p99_during_ms):.1f} ms "
             f"(max {max(r.p99_during_ms, default=float('nan')):.1f})",
             f"failed answers or lost writes: {len(r.failures)}", _seconds(t))], r.failures


def soak(args: argparse.Namespace, world: World, tmp: Path, seed: int) -> tuple[list[Row], list[str]]:
    from tests.chaos.swaps_soak import plot_soak, run_soak

    t = time.monotonic()
    r = run_soak(world, tmp / "soak", args.soak_minutes, seed)
    if args.plot is not None:
        plot_soak(r, args.plot)
    first, last = r.samples[0], r.samples[-1]
    p50s, p99s = [s[2] for s in r.samples], [s[3] for s in r.samples]
    return [(f"soak: {args.soak_minutes:g} min of paced searches, recommendations, upserts and deletes",
             f"{sum(r.codes.values())} calls",
             f"RSS {first[1]:.0f} -> {last[1]:.0f} MiB (anon {r.kinds[0][0]:.0f} -> {r.kinds[-1][0]:.0f}, file "
             f"{r.kinds[0][1]:.0f} -> {r.kinds[-1][1]:.0f}), growth {r.growth_mib_per_hour():+.1f} MiB/h (second half); "
             f"search p50 {_median(p50s):.1f} ms, p99 {_median(p99s):.1f} ms (median of windows)",
             f"failed answers or lost writes: {len(r.failures)}", _seconds(t))], r.failures


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-cuts", type=int, default=100, help="power cuts of the live-write log under writes")
    parser.add_argument("--publish-cuts", type=int, default=50, help="power cuts of publish (and prune)")
    parser.add_argument("--truncate-cuts", type=int, default=50, help="power cuts of the reindex's log truncate")
    parser.add_argument("--write-kills", type=int, default=200, help="SIGKILLs of serve during writes")
    parser.add_argument("--reindex-kills", type=int, default=50, help="SIGKILLs of reindex, phases in turn")
    parser.add_argument("--requests", type=int, default=10_000, help="generated requests over the contract")
    parser.add_argument("--mutations", type=int, default=1_000, help="mutated index files offered to a server")
    parser.add_argument("--swaps", type=int, default=10, help="model+index hot swaps under load")
    parser.add_argument("--soak-minutes", type=float, default=20, help="minutes of steady mixed traffic")
    parser.add_argument("--plot", type=Path, default=None, help="write the soak's plot (PNG) here")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    quiet_env()
    console = Console(width=170)  # a table, also when the output is a file or a CI log
    rows: list[Row] = []
    failures: list[str] = []
    started = time.monotonic()
    server_parts: list[tuple[str, int | float, Callable[..., tuple[list[Row], list[str]]]]] = [
        ("kills", args.write_kills + args.reindex_kills, kills), ("requests", args.requests, requests),
        ("mutations", args.mutations, mutations), ("swaps", args.swaps, swaps), ("soak", args.soak_minutes, soak)]
    with tempfile.TemporaryDirectory(prefix="onetower-chaos-") as name:
        tmp = Path(name)
        if "cuts" in only and args.log_cuts + args.publish_cuts + args.truncate_cuts > 0:
            why = prerequisites()
            if why is not None:
                print(f"chaos: cannot mount the lost-write filesystem: {why}", file=sys.stderr)
                return 2
            part_rows, part_failures = power_cuts(args, tmp / "cuts", seed)
            rows += part_rows
            failures += part_failures
        world: World | None = None
        for part, count, run in server_parts:
            if part not in only or not count:
                continue
            if world is None:
                world = make_world(tmp / "world", seed)
            console.print(f"chaos: {part} ...")
            part_rows, part_failures = run(args, world, tmp / part, seed)
            rows += part_rows
            failures += part_failures
    table = Table(title=f"make chaos (seed {seed}, {time.monotonic() - started:.0f} s)")
    for column in ("scenario", "count", "context", "failures", "time"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in failures[:20]:
        console.print(line, style="red", markup=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
