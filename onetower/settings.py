"""Every setting a command reads from the environment: one list, the options built from it, the README's table.

A setting's flag means the same on every command that has it, and each of those commands reads the same
variables for it; `tests/unit/test_settings.py` checks the commands against this list and the README against
`markdown_table()`. The flags that mean something else on one command are in `OTHER_MEANINGS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from embed.encoder import Precision
from index.config import HnswStorage, IndexKind, IvfCode
from service.config import DEFAULT_PORT
from service.explorer.config import DEFAULT_EXPLORER_PORT
from service.logs import FORMATS
from training.lifecycle.tracking import DEFAULT_MODEL_URI
from training.reindex.driver import Engine

GLOBAL = "onetower"  # options given before the command: `onetower --log-format json serve`


@dataclass(frozen=True)
class Setting:
    """One option, the variables it falls back to (first set wins), its default and the commands that take it."""

    flags: tuple[str, ...]
    envvars: tuple[str, ...]
    default: Any  # what the command gets with neither flag nor variable; None: required, or unset
    meaning: str  # the option's --help and the README's column
    commands: tuple[str, ...]
    shown_default: str = ""  # for the README when `default` needs words (None that means something)

    def option(self, **checks: Any) -> Any:
        """The typer option for a command signature; `checks` are typer's own (exists=True, min=1, ...)."""
        shown = self.default is None and self.shown_default and not self.shown_default.startswith("—")
        help_text = f"{self.meaning} (default: {self.shown_default})" if shown else self.meaning
        return typer.Option(*self.flags, envvar=list(self.envvars), help=help_text, **checks)

    def default_text(self) -> str:
        if self.shown_default:
            return self.shown_default
        if self.default is None:
            return "—"
        return str(self.default.value if isinstance(self.default, Enum) else self.default)


TRACKING_URI = Setting(
    ("--tracking-uri",), ("ONETOWER_TRACKING_URI", "MLFLOW_TRACKING_URI"), None,
    "MLflow tracking and registry URI, e.g. sqlite:///mlflow.db or http://mlflow:5000.",
    ("train", "reindex", "serve", "evaluate", "promote", "rollback", "refresh", "explore"),
    shown_default="sqlite:///mlflow.db in the current folder")
MODEL = Setting(
    ("--model",), ("ONETOWER_MODEL",), DEFAULT_MODEL_URI,
    "Registry reference (models:/NAME@ALIAS or models:/NAME/VERSION) or a local encoder folder.",
    ("reindex", "serve"))
INDEX_ROOT = Setting(
    ("--index-root",), ("ONETOWER_INDEX_ROOT",), Path("index"),
    "Folder that reindex publishes index versions into (CURRENT points at the served one).",
    ("reindex", "serve", "promote", "rollback", "refresh", "explore"))
CATALOG = Setting(
    ("--catalog",), ("ONETOWER_CATALOG",), None, "Catalog parquet (README's schema).",
    ("train", "reindex", "refresh", "evaluate", "query", "explore"),
    shown_default="— (train, reindex, refresh need it)")
INTERACTIONS = Setting(
    ("--interactions",), ("ONETOWER_INTERACTIONS",), None,
    "Interactions parquet: user_id, item_id, ts, event, weight.",
    ("train", "refresh", "evaluate"), shown_default="— (train, refresh need it)")
DATA = Setting(("--out",), ("ONETOWER_DATA",), None, "Folder synth writes the dataset into.", ("synth",),
               shown_default="— (required)")
RUNS = Setting(("--out",), ("ONETOWER_RUNS",), Path("runs"), "Folder for train's checkpoints and saved encoder.",
               ("train",))
TRAIN_CONFIG = Setting(
    ("--config",), ("ONETOWER_TRAIN_CONFIG",), "demo",
    "Training YAML file, or a bundled name: demo, tiny, gpu, curriculum.", ("train", "refresh"))
EXPERIMENT = Setting(("--experiment",), ("ONETOWER_EXPERIMENT",), None, "MLflow experiment of the training run.",
                     ("train",), shown_default="the config's")
INDEX_KIND = Setting(("--kind",), ("ONETOWER_INDEX_KIND",), IndexKind.auto,
                     "FAISS index kind: flat, hnsw, ivfpq, or auto (by catalog size).", ("reindex",))
HNSW_STORAGE = Setting(
    ("--hnsw-storage",), ("ONETOWER_HNSW_STORAGE",), HnswStorage.flat,
    "hnsw: the vectors the graph walks over. sq8 (8-bit codes, re-ranked against the fp32 vectors) searched "
    "1.15-1.5x faster than flat at recall 0.95, fp16 0.93-1.33x (docs/PERFORMANCE.md).", ("reindex",))
IVF_CODE = Setting(
    ("--ivf-code",), ("ONETOWER_IVF_CODE",), IvfCode.pq8,
    "ivfpq: its codes. pq8: 32 bytes a vector, 8-bit after OPQ, 4x re-rank. fastscan: dim/4 bytes (32 at dim "
    "128), 4-bit SIMD codes, 64x re-rank, no OPQ: at 10M items 1.3x the QPS to one caller, the same to eight, "
    "recall 0.935 vs 0.949, a shorter build (docs/PERFORMANCE.md).", ("reindex",))
DEVICE = Setting(("--device",), ("ONETOWER_DEVICE",), "auto", "Where reindex embeds: cpu, cuda, or auto.",
                 ("reindex",))
PRECISION = Setting(
    ("--precision",), ("ONETOWER_PRECISION",), Precision.fp32,
    "Encoder arithmetic: fp32, bf16 (about 2x faster on CPUs with AVX-512 BF16 or AMX and on recent GPUs; "
    "vectors within ~1e-3 cosine of fp32), or auto (bf16 only where the hardware has it). Use the same for "
    "reindex and serve.", ("reindex", "serve"))
ENGINE = Setting(("--engine",), ("ONETOWER_REINDEX_ENGINE",), Engine.local,
                 "Where reindex embeds: this process, or Ray Data actors (the `distributed` extra).", ("reindex",))
RAY_ADDRESS = Setting(("--address",), ("RAY_ADDRESS",), None,
                      "--engine ray: an existing Ray cluster.", ("reindex",), shown_default="a local Ray for the job")
HOST = Setting(("--host",), ("ONETOWER_HOST",), "127.0.0.1", "Interface serve binds; 0.0.0.0 for all.",
               ("serve",))
PORT = Setting(("--port",), ("ONETOWER_PORT",), DEFAULT_PORT, "gRPC port (0 picks a free one).", ("serve", "demo"))
METRICS_PORT = Setting(("--metrics-port",), ("ONETOWER_METRICS_PORT",), None,
                       "Serve Prometheus /metrics on this HTTP port.", ("serve", "demo"), shown_default="off")
METRICS_HOST = Setting(("--metrics-host",), ("ONETOWER_METRICS_HOST",), None,
                       "Interface for /metrics", ("serve",), shown_default="the gRPC --host")
AUTH_TOKEN = Setting(
    ("--auth-token", "--token"), ("ONETOWER_AUTH_TOKEN",), None,
    "Bearer token: serve requires `authorization: Bearer TOKEN` on every RPC but health; query and info send it.",
    ("serve", "query", "info", "explore"), shown_default="none (no auth)")
MAX_CONCURRENT_RPCS = Setting(
    ("--max-concurrent-rpcs",), ("ONETOWER_MAX_CONCURRENT_RPCS",), None,
    "Refuse calls beyond this many in flight at once with RESOURCE_EXHAUSTED (health is exempt).", ("serve",),
    shown_default="no limit")
PROCESSES = Setting(
    ("--processes",), ("ONETOWER_PROCESSES",), 1,
    "Server processes sharing the port (SO_REUSEPORT), each a whole server following the same index root "
    "and live-write log, restarted if it dies; 0: one per core. Not --threads, which counts a process's "
    "handler threads.", ("serve", "demo"))
TARGET = Setting(("--target",), ("ONETOWER_TARGET",), f"127.0.0.1:{DEFAULT_PORT}", "host:port of a running server.",
                 ("query", "info", "explore"))
LOG_FORMAT = Setting(
    ("--log-format",), ("ONETOWER_LOG_FORMAT",), None,
    f"Log lines on stderr: {' or '.join(FORMATS)} (one JSON object per line: ts, level, logger, msg, request_id, "
    "rpc, code, model_version, ...).", (GLOBAL, "serve", "demo", "refresh"), shown_default="text")
LOG_LEVEL = Setting(("--log-level",), ("ONETOWER_LOG_LEVEL",), "INFO", "DEBUG, INFO, WARNING or ERROR.", (GLOBAL,))
EXPLORER_HOST = Setting(("--explorer-host",), ("ONETOWER_EXPLORER_HOST",), "127.0.0.1",
                        "Interface the explorer's web page binds; it has no login of its own, so loopback unless "
                        "you mean it.", ("explore",))
EXPLORER_PORT = Setting(("--explorer-port",), ("ONETOWER_EXPLORER_PORT",), DEFAULT_EXPLORER_PORT,
                        "HTTP port of the explorer's web page (0 picks a free one).", ("explore", "demo"))
TLS_ROOT_CERT = Setting(("--tls-root-cert",), ("ONETOWER_TLS_ROOT_CERT",), None,
                        "PEM root certificate(s) to trust: the service speaks TLS (serve --tls-cert).", ("explore",),
                        shown_default="plaintext")

SETTINGS: tuple[Setting, ...] = (
    TRACKING_URI, MODEL, INDEX_ROOT, CATALOG, INTERACTIONS, DATA, RUNS, TRAIN_CONFIG, EXPERIMENT, INDEX_KIND,
    HNSW_STORAGE, IVF_CODE, DEVICE, PRECISION, ENGINE, RAY_ADDRESS, HOST, PORT, METRICS_PORT, METRICS_HOST, AUTH_TOKEN,
    MAX_CONCURRENT_RPCS, PROCESSES, TARGET, LOG_FORMAT, LOG_LEVEL,
    EXPLORER_HOST, EXPLORER_PORT, TLS_ROOT_CERT,
)

# The options several commands share, ready for a signature: `tracking_uri: TrackingOpt = None`.
TrackingOpt = Annotated[str | None, TRACKING_URI.option()]
ModelOpt = Annotated[str, MODEL.option()]
IndexRootOpt = Annotated[Path, INDEX_ROOT.option()]
CatalogOpt = Annotated[Path, CATALOG.option(exists=True, dir_okay=False)]  # required where it has no default
InteractionsOpt = Annotated[Path, INTERACTIONS.option(exists=True, dir_okay=False)]
OptionalCatalogOpt = Annotated[Path | None, CATALOG.option(exists=True, dir_okay=False)]
OptionalInteractionsOpt = Annotated[Path | None, INTERACTIONS.option(exists=True, dir_okay=False)]
TrainConfigOpt = Annotated[str, TRAIN_CONFIG.option()]
PrecisionOpt = Annotated[Precision, PRECISION.option()]
PortOpt = Annotated[int, PORT.option()]
MetricsPortOpt = Annotated[int | None, METRICS_PORT.option()]
TokenOpt = Annotated[str | None, AUTH_TOKEN.option()]
TargetOpt = Annotated[str, TARGET.option()]
LogFormatOpt = Annotated[str | None, LOG_FORMAT.option()]

# (command, flag) pairs that share a setting's flag but not its meaning, so they read no variable
OTHER_MEANINGS: dict[tuple[str, str], str] = {
    ("train", "--precision"): "Lightning's training precision (32-true, bf16-mixed), not the encoder's at inference",
    ("evaluate", "--out"): "the report folder",
    ("evaluate", "--config"): "its default follows --preset (eval-PRESET) or the size of your data",
}


def markdown_table() -> str:
    """The README's table of settings, one row per setting."""
    rows = ["| Option | Variables | Default | Commands | Meaning |", "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        flags = " ".join(f"`{f}`" for f in s.flags)
        envvars = ", ".join(f"`{e}`" for e in s.envvars)
        commands = ", ".join("`onetower` (before the command)" if c == GLOBAL else c for c in s.commands)
        meaning = s.meaning.replace("|", "\\|")
        rows.append(f"| {flags} | {envvars} | {s.default_text()} | {commands} | {meaning} |")
    return "\n".join(rows)
