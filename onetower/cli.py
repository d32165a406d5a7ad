"""The `onetower` command: composes the offline (training) and online (service) sub-commands, plus `demo`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from mlflow.exceptions import MlflowException
from rich.console import Console

from index.config import IndexConfig
from service import cli as service_cli
from service.client import Client
from service.config import DEFAULT_PORT, ServiceConfig
from service.logs import FORMATS, configure_logging, set_format
from service.server import start_server
from training import cli as training_cli
from training import lifecycle_cli
from training.demo import prepare_demo
from training.fitting.config import load_train_config
from training.lifecycle.promote import DEFAULT_METRIC, REPORTED
from training.lifecycle.register import DEFAULT_ALIAS, MODEL_NAME, ensure_experiment
from training.lifecycle.tracking import use_tracking

console = Console()

app = typer.Typer(
    name="onetower", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="Multimodal recommendation embeddings: one early-fusion transformer over image patches and text, "
         "a FAISS index, a gRPC service.\n\nStart with [bold]onetower demo[/]: synthetic catalog -> train -> "
         "register in MLflow -> reindex -> serve -> query, all inside ./onetower-demo.")
app.registered_commands.extend(training_cli.app.registered_commands)
app.registered_commands.extend(lifecycle_cli.app.registered_commands)
app.registered_commands.extend(service_cli.app.registered_commands)


LogFormatOpt = Annotated[str | None, typer.Option(
    "--log-format", envvar="ONETOWER_LOG_FORMAT",
    help=f"Log lines on stderr: {' or '.join(FORMATS)} (one JSON object per line: ts, level, logger, msg, "
         "request_id, rpc, code, model_version, ...).")]


@app.callback()
def _setup(log_level: Annotated[str, typer.Option(envvar="ONETOWER_LOG_LEVEL",
                                                  help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
           log_format: LogFormatOpt = None) -> None:
    try:
        configure_logging(log_format or "text", log_level)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


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
    log_format: LogFormatOpt = None,
) -> None:
    """Run the whole product on an embedded default and keep serving it.

    synthetic catalog -> train (Lightning) -> register (MLflow, sqlite store in WORKDIR) ->
    reindex (FAISS) -> serve (gRPC) -> one example query. Run again on the same WORKDIR to
    reuse what is there. Ctrl-C stops the server.
    """
    set_format(log_format)
    started = time.perf_counter()
    art = prepare_demo(workdir, n_items=items, n_users=users, max_steps=max_steps, out=console)
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


@app.command("refresh")
def refresh_command(
    catalog: training_cli.CatalogOpt,
    interactions: training_cli.InteractionsOpt,
    index_root: Annotated[Path, typer.Option(envvar="ONETOWER_INDEX_ROOT", help="Published index folder.")]
    = Path("index"),
    workdir: Annotated[Path, typer.Option(help="State file, split, checkpoints, candidate; rerun to resume.")]
    = Path("refresh"),
    holdout: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                 help="Held-out interactions (else --holdout-items).")] = None,
    holdout_items: Annotated[float, typer.Option(help="Fraction of items held out as cold for evaluation.")]
    = 0.1,
    config: Annotated[str, typer.Option(help="Training YAML or bundled name (demo, tiny, gpu).")] = "demo",
    max_steps: Annotated[int | None, typer.Option(min=1, help="Fine-tuning steps (default: the config's).")]
    = None,
    model_name: Annotated[str, typer.Option(help="Registered model.")] = MODEL_NAME,
    alias: Annotated[str, typer.Option(help="The alias the service follows.")] = DEFAULT_ALIAS,
    metric: Annotated[str, typer.Option(help=f"Decides promotion: one of {', '.join(REPORTED)}.")]
    = DEFAULT_METRIC,
    force: Annotated[bool, typer.Option(help="Promote even if the candidate evaluates worse.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Fine-tune and evaluate only: register, publish, promote nothing.")]
    = False,
    tracking_uri: Annotated[str | None, typer.Option(envvar="MLFLOW_TRACKING_URI",
                                                     help="MLflow URI (default: sqlite:///mlflow.db here).")] = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Fine-tune the champion on the latest interactions; evaluate, register, reindex, promote if no worse.

    The job to schedule (cron, Airflow). Example:

        onetower refresh --catalog data/catalog.parquet --interactions data/interactions.parquet \\
            --index-root index --workdir refresh-2026-11-25

    Each finished step is recorded in WORKDIR/refresh-state.json: rerun after a crash and it resumes;
    rerun a finished refresh and it only prints the summary. Exit code 0 whether or not it promoted.
    """
    set_format(log_format)
    _, artifact_root = use_tracking(tracking_uri, Path.cwd())
    try:
        train_config = load_train_config(config).replace(max_steps=max_steps)
        # Lightning loads here, not for serve
        from training.lifecycle.refresh import RefreshConfig, refresh, summary_table

        settings = RefreshConfig(catalog=catalog.resolve(), interactions=interactions.resolve(),
                                 workdir=workdir.resolve(), index_root=index_root.resolve(), train=train_config,
                                 holdout=holdout.resolve() if holdout else None, holdout_fraction=holdout_items,
                                 model_name=model_name, alias=alias, metric=metric, force=force, dry_run=dry_run,
                                 index_config=IndexConfig())
    except (OSError, ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    ensure_experiment(train_config.experiment, artifact_root)

    def show(step: str, done: bool) -> None:
        console.print(f"[dim]{step}: done before, skipped[/]" if done else f"[bold]{step}[/] ...")

    try:
        result = refresh(settings, progress_bar=False, on_step=show)
    except MlflowException as e:
        console.print(f"[red]error[/]: {e.message} (is {model_name}@{alias} registered at this tracking URI?)")
        raise typer.Exit(1) from None
    except ValueError as e:
        console.print(f"[red]error[/]: {e}")
        raise typer.Exit(1) from None
    console.print(summary_table(result, settings))


def _example_item(catalog: Path) -> str:
    """An item with both a title and an image, so the example shows both modalities at work."""
    frame = pl.read_parquet(catalog, columns=["item_id", "title", "image_paths"])
    both = frame.filter((pl.col("title") != "") & pl.col("image_paths").is_not_null())
    return str((both if both.height else frame)["item_id"][0])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
