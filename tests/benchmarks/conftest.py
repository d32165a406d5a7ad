"""Benchmarks: deselected by default (`-m 'not benchmark'` in pyproject); `make bench` runs them."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import faiss
import torch

RESULTS = Path(os.environ.get("ONETOWER_BENCH_OUT", "bench-results"))
QUICK = os.environ.get("ONETOWER_BENCH_QUICK") == "1"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "command": command()}


def command() -> str:
    """The command that ran this process, as typed (`python -m pytest ...`, not pytest's __main__.py path)."""
    argv0 = Path(sys.argv[0]).name
    prefix = "python -m pytest" if argv0 in ("__main__.py", "pytest", "py.test") else sys.argv[0]
    extra = " ".join(sys.argv[1:])
    quick = "ONETOWER_BENCH_QUICK=1 " if QUICK else ""
    return f"{quick}{prefix} {extra}".strip()


def write_result(name: str, rows: list[dict[str, Any]], notes: str = "") -> Path:
    """Save rows as JSON and a markdown table (with the machine and the command) under bench-results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows, "notes": notes}, indent=2))
    cols = list(rows[0])
    lines = [f"# {name}", "", f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
             f"faiss {info['faiss']}", f"command: `{info['command']}`", "", notes, "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |" for r in rows]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
