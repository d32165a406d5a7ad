"""The `onetower` command: composes train_cli (synth, train, reindex), lifecycle_cli (evaluate, promote,
rollback, refresh) and serve_cli (serve, query, info), plus `demo`; settings.py lists what they read from the
environment."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.console import Console

from onetower import explore_cli, lifecycle_cli, serve_cli, train_cli
from onetower.settings import (
    EXPLORER_PORT,
    LOG_LEVEL,
    PORT,
    PROCESSES,
    LogFormatOpt,
    MetricsPortOpt,
    PortOpt,
)
from service.client import Client
from service.config import ServiceConfig
from service.explorer import ExplorerConfig, start_explorer
from service.logs import configure_logging, set_format
from service.server import start_server
from training.demo import prepare_demo

console = Console()

app = typer.Typer(
    name="onetower", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="Multimodal recommendation embeddings: one early-fusion transformer over image patches and text, "
         "a FAISS index, a gRPC service.\n\nStart with [bold]onetower demo[/]: synthetic catalog -> train -> "
         "register in MLflow -> reindex -> serve -> query, all inside ./onetower-demo.")
app.registered_commands.extend(train_cli.app.registered_commands)
app.registered_commands.extend(lifecycle_cli.app.registered_commands)
app.registered_commands.extend(serve_cli.app.registered_commands)
app.registered_commands.extend(explore_cli.app.registered_commands)


@app.callback()
def _setup(log_level: Annotated[str, LOG_LEVEL.option()] = LOG_LEVEL.default, log_format: LogFormatOpt = None) -> None:
    try:
        configure_logging(log_format or "text", log_level)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Everything the demo makes goes here; run again to reuse it.")]
    = Path("onetower-demo"),
    port: PortOpt = PORT.default,
    metrics_port: MetricsPortOpt = None,
    items: Annotated[int, typer.Option(help="Synthetic catalog size.")] = 2000,
    users: Annotated[int, typer.Option(help="Synthetic users.")] = 600,
    max_steps: Annotated[int | None, typer.Option(help="Training steps (default: the demo config's).")] = None,
    exit_after_query: Annotated[bool, typer.Option(help="Stop after the example query instead of serving.")]
    = False,
    processes: Annotated[int, PROCESSES.option(min=0)] = PROCESSES.default,
    explorer_port: Annotated[int, EXPLORER_PORT.option(min=0, max=65535)] = EXPLORER_PORT.default,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the whole product on an embedded default and keep serving it.

    synthetic catalog -> train (Lightning) -> register (MLflow, sqlite store in WORKDIR) ->
    reindex (FAISS) -> serve (gRPC) -> one example query, and the explorer's web page beside the
    server. Run again on the same WORKDIR to reuse what is there. Ctrl-C stops both.
    """
    set_format(log_format)
    started = time.perf_counter()
    art = prepare_demo(workdir, n_items=items, n_users=users, max_steps=max_steps, out=console)
    config = ServiceConfig(model_uri=art.model_uri, index_root=art.index_root, tracking_uri=art.tracking_uri,
                           port=port, metrics_port=metrics_port, cache_dir=workdir / "model-cache")
    count = processes or os.cpu_count() or 1
    port, stop, serve_on = _serve(config, count)
    target = f"127.0.0.1:{port}"
    console.print(f"[green]serving[/] on {target} after {time.perf_counter() - started:.0f}s"
                  + (f" ({count} processes)" if count > 1 else ""))
    try:
        explorer_url, stop_explorer = start_explorer(ExplorerConfig(
            target=target, catalog=art.dataset.catalog, tracking_uri=art.tracking_uri,
            index_root=art.index_root, cache_dir=workdir / "model-cache", port=explorer_port))
        console.print(f"[green]explorer[/] on {explorer_url}  (look at neighbours, drop in a new item)")
    except RuntimeError as e:  # its port taken: the demo still serves
        stop_explorer = _nothing
        console.print(f"[yellow]explorer not started[/]: {e}")
    titles = serve_cli.load_titles(art.dataset.catalog)
    query_id = _example_item(art.dataset.catalog)
    with Client(target) as client:
        neighbours = client.similar(item_ids=[query_id], k=5)[0]
    console.print(f"example query [bold]{query_id}[/]: {titles.get(query_id, '')}")
    console.print(serve_cli.neighbours_table(query_id, neighbours, titles))
    console.print(
        "From another terminal:\n"
        f"  .venv/bin/onetower query {query_id} -k 10 --target {target} --catalog {art.dataset.catalog}\n"
        f"  .venv/bin/onetower info --target {target}\n"
        f"  grpcurl -plaintext {target} list   (reflection is on)")
    try:
        if exit_after_query:
            stop()
            return
        serve_on()
    finally:
        stop_explorer()


def _nothing() -> None:
    pass


def _serve(config: ServiceConfig, processes: int) -> tuple[int, Callable[[], None], Callable[[], None]]:
    """Start one server or a process group: (port, stop now, serve until a signal then stop)."""
    if processes > 1:
        group, held = serve_cli.start_group_or_exit(config, processes)

        def stop_group() -> None:
            group.stop()
            held.close()

        return group.port, stop_group, lambda: serve_cli.supervise_until_signal(group, held)
    running = start_server(config)
    return running.port, running.stop, lambda: serve_cli.serve_until_signal(running)


def _example_item(catalog: Path) -> str:
    """An item with both a title and an image, so the example shows both modalities at work."""
    frame = pl.read_parquet(catalog, columns=["item_id", "title", "image_paths"])
    both = frame.filter((pl.col("title") != "") & pl.col("image_paths").is_not_null())
    return str((both if both.height else frame)["item_id"][0])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
