"""`onetower serve`, `onetower query` and `onetower info`: the online side's commands."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import grpc
import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from onetower.settings import (
    CATALOG,
    DEFAULT_MODEL_URI,
    HOST,
    INDEX_ROOT,
    MAX_CONCURRENT_RPCS,
    METRICS_HOST,
    PRECISION,
    PROCESSES,
    TARGET,
    IndexRootOpt,
    LogFormatOpt,
    MetricsPortOpt,
    ModelOpt,
    PortOpt,
    PrecisionOpt,
    TargetOpt,
    TokenOpt,
    TrackingOpt,
)
from service.client import Client, Neighbor
from service.config import DEFAULT_PORT, ServiceConfig
from service.group import PortInUseError, ProcessGroup, start_group
from service.logs import set_format
from service.server import RunningServer, start_server

logger = logging.getLogger(__name__)
console = Console()

app = typer.Typer(no_args_is_help=True, add_completion=False)


# long: typer declares each option in the signature; the body is parse -> call -> print
@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL_URI,
    index_root: IndexRootOpt = INDEX_ROOT.default,
    tracking_uri: TrackingOpt = None,
    host: Annotated[str, HOST.option()] = HOST.default,
    port: PortOpt = DEFAULT_PORT,
    threads: Annotated[int, typer.Option("--threads", "--workers", min=1,
                                         help="gRPC handler threads in each process (--workers: the old name).")]
    = 8,
    processes: Annotated[int, PROCESSES.option(min=0)] = PROCESSES.default,
    poll_seconds: Annotated[float, typer.Option(
        help="How often to look for a new model alias / published index pair (0: never).")] = 30.0,
    metrics_port: MetricsPortOpt = None,
    metrics_host: Annotated[str | None, METRICS_HOST.option()] = None,
    cache_dir: Annotated[Path, typer.Option(help="Where registry model files are downloaded.")]
    = Path(".onetower-cache"),
    auth_token: TokenOpt = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve TLS only.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert.")] = None,
    max_concurrent_rpcs: Annotated[int | None, MAX_CONCURRENT_RPCS.option(min=1)] = None,
    registry_timeout: Annotated[float, typer.Option(
        help="Seconds the watcher waits for the registry per poll (one try; requests never wait).")] = 5.0,
    precision: PrecisionOpt = PRECISION.default,
    log_format: LogFormatOpt = None,
) -> None:
    """Serve the gRPC API for the model the registry alias names and the index published for it.

    Example:

        onetower serve --model models:/onetower-encoder@champion --index-root ./index \\
            --tracking-uri sqlite:///mlflow.db --port 50051 --metrics-port 9090

    Health (grpc.health.v1) answers NOT_SERVING until model and index are loaded; reflection is on,
    so `grpcurl -plaintext localhost:50051 list` shows the API. SIGTERM or Ctrl-C stops gracefully.
    """
    set_format(log_format)
    bound_registry_downloads()
    config = ServiceConfig(model_uri=model, index_root=index_root, tracking_uri=tracking_uri, host=host, port=port,
                           workers=threads, poll_seconds=poll_seconds, metrics_port=metrics_port,
                           metrics_host=metrics_host, cache_dir=cache_dir, auth_token=auth_token, tls_cert=tls_cert,
                           tls_key=tls_key, max_concurrent_rpcs=max_concurrent_rpcs,
                           registry_timeout_s=registry_timeout, precision=precision.value)
    count = processes or os.cpu_count() or 1
    if count > 1:
        serve_group_until_signal(config, count)
        return
    running = start_server(config)
    console.print(f"[green]serving[/] on {host}:{running.port}  (Ctrl-C to stop)")
    serve_until_signal(running)


def serve_group_until_signal(config: ServiceConfig, processes: int) -> None:
    """Start a `--processes` group, print where it serves, supervise it until SIGINT/SIGTERM, then stop it."""
    group, held = start_group_or_exit(config, processes)
    console.print(f"[green]serving[/] on {config.host}:{group.port} with {processes} processes "
                  f"(pids {', '.join(map(str, group.pids))}; Ctrl-C to stop)")
    supervise_until_signal(group, held)


def start_group_or_exit(config: ServiceConfig, processes: int) -> tuple[ProcessGroup, contextlib.ExitStack]:
    try:
        return start_group(config, processes)
    except PortInUseError as e:
        console.print(f"[red]error[/]: {e}")
        raise typer.Exit(1) from None


def supervise_until_signal(group: ProcessGroup, held: contextlib.ExitStack) -> None:
    """Restart members that die until SIGINT/SIGTERM, then stop the group and release its port."""
    def _stop(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping the process group", signum)
        group.request_stop()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        group.supervise()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        group.stop()
        held.close()


# A registry that accepts connections and then hangs mid-download would hold the watcher for MLflow's
# default 120 s per read x 7 retries with backoff (~15 min) before it could try again; these bound it
# to ~2 min. A variable the user set wins.
REGISTRY_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}


def bound_registry_downloads() -> None:
    """Set MLflow's HTTP read timeout and retries for this process where the user has not."""
    for name, value in REGISTRY_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def serve_until_signal(running: RunningServer) -> None:
    """Block until SIGINT/SIGTERM, then stop gracefully (in-flight calls finish, the log is closed)."""
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        logger.info("signal %d: shutting down", signum)
        done.set()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        done.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        running.stop()


def load_titles(catalog: Path | None) -> dict[str, str]:
    """item_id -> title from a catalog parquet (empty when no catalog is given)."""
    if catalog is None or not catalog.exists():
        return {}
    frame = pl.read_parquet(catalog, columns=["item_id", "title"])
    return dict(zip(frame["item_id"].cast(pl.String).to_list(), frame["title"].fill_null("").to_list(), strict=True))


def neighbours_table(query: str, neighbours: list[Neighbor], titles: dict[str, str]) -> Table:
    """A rich table of neighbours (rank, id, score, title when known)."""
    table = Table(title=f"neighbours of {query}")
    table.add_column("#", justify="right")
    table.add_column("item_id")
    table.add_column("score", justify="right")
    table.add_column("title")
    for rank, n in enumerate(neighbours, 1):
        table.add_row(str(rank), n.item_id, f"{n.score:.4f}", titles.get(n.item_id, ""))
    return table


@app.command()
def query(
    item_id: Annotated[list[str], typer.Argument(help="One or more item ids to find neighbours for.")],
    k: Annotated[int, typer.Option("-k", help="Neighbours per item (1..1000).")] = 10,
    target: TargetOpt = TARGET.default,
    catalog: Annotated[Path | None, CATALOG.option(dir_okay=False)] = None,
    timeout: Annotated[float, typer.Option(help="Deadline per call, seconds.")] = 10.0,
    token: TokenOpt = None,
) -> None:
    """Ask a running server for the items most similar to ITEM_ID (never the item itself); --catalog shows titles.

    Example:

        onetower query item-000042 -k 5 --target 127.0.0.1:50051 --catalog data/catalog.parquet
    """
    titles = load_titles(catalog)
    with Client(target, timeout=timeout, token=token) as client:
        try:
            results = client.similar(item_ids=item_id, k=k)
        except grpc.RpcError as e:
            console.print(f"[red]{e.code().name}[/]: {e.details()}")
            raise typer.Exit(1) from None
    for qid, neighbours in zip(item_id, results, strict=True):
        if qid in titles:
            console.print(f"[bold]{qid}[/]: {titles[qid]}")
        console.print(neighbours_table(qid, neighbours, titles))


@app.command()
def info(target: TargetOpt = TARGET.default,
         timeout: Annotated[float, typer.Option(help="Deadline, seconds.")] = 10.0, token: TokenOpt = None) -> None:
    """Show what a running server serves: model name, version and alias, index version, kind, size."""
    with Client(target, timeout=timeout, token=token) as client:
        try:
            resp = client.info()
        except grpc.RpcError as e:
            console.print(f"[red]{e.code().name}[/]: {e.details()}")
            raise typer.Exit(1) from None
    table = Table(show_header=False)
    for field in ("model_name", "model_version", "model_alias", "index_version", "index_kind", "item_count", "dim"):
        table.add_row(field, str(getattr(resp, field)))
    console.print(table)
