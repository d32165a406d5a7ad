"""The `onetower` command: composes the offline (training) and online (service) sub-commands, plus `demo`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.logging import RichHandler

from service import cli as service_cli
from service.client import Client
from service.config import DEFAULT_PORT, ServiceConfig
from service.server import start_server
from training import cli as training_cli
from training import lifecycle_cli

console = Console()

app = typer.Typer(
    name="onetower", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="Multimodal recommendation embeddings: one early-fusion transformer over image patches and text, "
         "a FAISS index, a gRPC service.\n\nStart with [bold]onetower demo[/]: synthetic catalog -> train -> "
         "register in MLflow -> reindex -> serve -> query, all inside ./onetower-demo.")
app.registered_commands.extend(training_cli.app.registered_commands)
app.registered_commands.extend(lifecycle_cli.app.registered_commands)
app.registered_commands.extend(service_cli.app.registered_commands)


@app.callback()
def _setup(log_level: Annotated[str, typer.Option(envvar="ONETOWER_LOG_LEVEL",
                                                  help="DEBUG, INFO, WARNING or ERROR.")] = "INFO") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)], force=True)
    for noisy in ("mlflow", "alembic", "pytorch_lightning", "lightning_fabric", "faiss.loader", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Everything the demo makes goes here; run again to reuse it.")]
    = Path("onetower-demo"),
    port: Annotated[int, typer.Option(help="gRPC port.")] = DEFAULT_PORT,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics on this port.")] = None,
    items: Annotated[int, typer.Option(help="Synthetic catalog size.")] = 2000,
    users: Annotated[int, typer.Option(help="Synthetic users.")] = 600,
    max_steps: Annotated[int | None, typer.Option(help="Training steps (default: the demo config's).")] = None,
    exit_after_query: Annotated[bool, typer.Option(help="Stop after the example query instead of serving.")]
    = False,
) -> None:
    """Run the whole product on an embedded default and keep serving it.

    synthetic catalog -> train (Lightning) -> register (MLflow, sqlite store in WORKDIR) ->
    reindex (FAISS) -> serve (gRPC) -> one example query. Run again on the same WORKDIR to
    reuse what is there. Ctrl-C stops the server.
    """
    started = time.perf_counter()
    art = training_cli.prepare_demo(workdir, n_items=items, n_users=users, max_steps=max_steps, console=console)
    config = ServiceConfig(model_uri=art.model_uri, index_root=art.index_root, tracking_uri=art.tracking_uri,
                           port=port, metrics_port=metrics_port, cache_dir=workdir / "model-cache")
    running = start_server(config)
    target = f"127.0.0.1:{running.port}"
    console.print(f"[green]serving[/] on {target} after {time.perf_counter() - started:.0f}s")
    titles = service_cli.load_titles(art.dataset.catalog)
    query_id = _example_item(art.dataset.catalog)
    with Client(target) as client:
        neighbours = client.similar(item_ids=[query_id], k=5)[0]
    console.print(f"example query [bold]{query_id}[/]: {titles.get(query_id, '')}")
    console.print(service_cli.neighbours_table(query_id, neighbours, titles))
    console.print(
        "From another terminal:\n"
        f"  .venv/bin/onetower query {query_id} -k 10 --target {target} --catalog {art.dataset.catalog}\n"
        f"  .venv/bin/onetower info --target {target}\n"
        f"  grpcurl -plaintext {target} list   (reflection is on)")
    if exit_after_query:
        running.stop()
        return
    service_cli.serve_until_signal(running)


def _example_item(catalog: Path) -> str:
    """An item with both a title and an image, so the example shows both modalities at work."""
    frame = pl.read_parquet(catalog, columns=["item_id", "title", "image_paths"])
    both = frame.filter((pl.col("title") != "") & pl.col("image_paths").is_not_null())
    return str((both if both.height else frame)["item_id"][0])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
