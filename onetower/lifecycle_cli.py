"""`onetower evaluate`, `promote`, `rollback` and `refresh`: the model lifecycle commands of ML teams."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from mlflow.exceptions import MlflowException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from index.config import IndexConfig
from onetower.settings import (
    INDEX_ROOT,
    TRAIN_CONFIG,
    CatalogOpt,
    IndexRootOpt,
    InteractionsOpt,
    LogFormatOpt,
    OptionalCatalogOpt,
    OptionalInteractionsOpt,
    TrackingOpt,
    TrainConfigOpt,
)
from service.logs import set_format
from training.data.catalog import read_interactions
from training.data.features import count_pairs
from training.data.synthetic import PRESETS, generate
from training.evaluation.metrics import DEFAULT_KS
from training.evaluation.run import MODELS, EvalData, Recipe, run_evaluation
from training.fitting.config import data_budget, load_train_config
from training.lifecycle.promote import DEFAULT_METRIC, REPORTED, PromotionError, promote, rollback
from training.lifecycle.register import DEFAULT_ALIAS, MODEL_NAME, ensure_experiment
from training.lifecycle.scoring import score_registered
from training.lifecycle.tracking import log_evaluation, use_tracking

console = Console()
app = typer.Typer(no_args_is_help=True, add_completion=False)

EVAL_CONFIGS = {"small": "eval-small", "medium": "eval-medium", "tiny": "tiny", "conjunction": "eval-conjunction"}  # training config of each preset's models


# long: typer declares each option in the signature; the body is parse -> call -> print
@app.command()
def evaluate(
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, report.md and the plots.")] = Path("eval"),
    preset: Annotated[str | None, typer.Option(help="Synthetic preset: small, medium or tiny (generated under OUT/data).")]
    = None,
    data: Annotated[Path | None, typer.Option(help="A dataset folder in the `onetower synth` layout.")] = None,
    catalog: OptionalCatalogOpt = None,
    interactions: OptionalInteractionsOpt = None,
    holdout_items: Annotated[float | None, typer.Option(
        help="Hold out this fraction of items (all their events) as cold-start targets.")] = None,
    config: Annotated[str | None, typer.Option(
        help="Training YAML or bundled name (tiny, demo, gpu, eval-small, eval-medium, eval-conjunction); default: "
             "the preset's eval-PRESET; for --catalog, eval-small with steps sized from your data (3 epochs of "
             "its co-engagement pairs, 100 to 3000 steps); for --data, tiny.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Training steps for every trained model.")] = None,
    models: Annotated[str, typer.Option(help=f"Comma-separated, among {','.join(MODELS)}.")] = ",".join(MODELS),
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds; metrics average over them.")] = "0",
    curriculum: Annotated[bool, typer.Option(
        help="Train the from-scratch native encoder through the curriculum (stages 1 and 2 before 3).")] = False,
    moe: Annotated[int, typer.Option(min=0, help="Routed experts per block for native and native_pretrained "
                                             "(a modality-aware mixture of experts); 0: dense.")] = 0,
    register_version: Annotated[str | None, typer.Option(
        help="Comma-separated registered versions of onetower-encoder: score each one's own encoder on this "
             "holdout and tag it with its metrics and the split's fingerprint (what promote compares). "
             "--models popularity skips training the rivals.")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Cold-start evaluation: native vs text-only, image-only, stitched, pretrained stitched, popularity, random.

    Examples:

        onetower evaluate --preset small --out eval-small

        onetower evaluate --catalog my/catalog.parquet --interactions my/events.parquet --holdout-items 0.1

        onetower evaluate --data data --models popularity --register-version 3,4   (then: onetower promote 4)

    Writes OUT/metrics.json, OUT/report.md and PNG plots (recall@K with 95% bootstrap intervals,
    a 2D projection of item embeddings, a neighbour gallery of cold items), and logs them to MLflow.
    stitched_pretrained needs the optional `baselines` extra; without it, it is reported as skipped.
    """
    _, artifact_root = use_tracking(tracking_uri, Path.cwd())
    own_data = data is None and catalog is not None  # --data wins over a catalog from ONETOWER_CATALOG
    train_config = load_train_config(config or EVAL_CONFIGS.get(preset or "", "eval-small" if own_data else "tiny"))
    if max_steps is not None:
        train_config = dataclasses.replace(train_config, max_steps=max_steps)
    elif config is None and preset is None and data is None and interactions is not None:
        budget = data_budget(count_pairs(read_interactions(interactions), train_config.window),
                             train_config.batch_size)
        train_config = dataclasses.replace(train_config, max_steps=budget.steps)
        console.print(f"training budget for your data: {budget.describe()} (--config or --max-steps override)")
    ensure_experiment(train_config.experiment, artifact_root)  # artifacts beside a sqlite store, not in ./mlruns
    if preset is not None:
        if preset not in PRESETS:
            raise typer.BadParameter(f"{preset!r}: choose one of {sorted(PRESETS)}", param_hint="--preset")
        data = out / "data"
        if not (data / "meta.json").exists():
            generate(data, PRESETS[preset])
    source: Path | EvalData
    if data is not None:
        source = data
    elif catalog is not None and interactions is not None:
        source = EvalData(catalog, interactions)
        if holdout_items is None:
            raise typer.BadParameter("your own data needs --holdout-items FRACTION", param_hint="--holdout-items")
    else:
        raise typer.BadParameter("give --preset, --data, or --catalog with --interactions")
    result = run_evaluation(source, out, train_config, models=[m for m in models.split(",") if m],
                            seeds=[int(s) for s in seeds.split(",")], ks=DEFAULT_KS, holdout_items=holdout_items,
                            preset=preset, progress_bar=True, recipe=Recipe(curriculum=curriculum, moe_experts=moe))
    log_evaluation(result, out, train_config.experiment)
    table = Table(title=f"cold-start evaluation ({result.get('n_users', '?')} users)")
    for col in ("model", "recall@20", "95% CI", "ndcg@20"):
        table.add_column(col)
    for name, m in result["models"].items():
        if "skipped" in m:
            table.add_row(name, "skipped", escape(m["skipped"]), "")  # the reason names pip's [extra]
            continue
        lo, hi = m.get("recall@20_ci", [float("nan")] * 2)
        table.add_row(name, f"{m['recall@20']:.4f}", f"[{lo:.4f}, {hi:.4f}]", f"{m['ndcg@20']:.4f}")
    console.print(table)
    console.print(f"report: {out / 'report.md'}")
    if register_version is not None:
        _score_versions([v for v in register_version.split(",") if v], result["split"], out, preset)


def _score_versions(versions: list[str], files: dict[str, str], out: Path, preset: str | None) -> None:
    """Score registered versions' own encoders on the evaluation's split; tag them; print what they earned."""
    try:
        split, scores = score_registered(versions, MODEL_NAME, Path(files["catalog"]), Path(files["train"]),
                                         Path(files["holdout"]), out / "model-cache",
                                         {"out": str(out.resolve()), "preset": preset})
    except MlflowException as e:
        console.print(f"[red]error[/]: {escape(e.message)}")
        raise typer.Exit(1) from None
    table = Table(title=f"registered versions of {MODEL_NAME} on split {split.fingerprint[:12]}")
    for col in ("version", *REPORTED, "held-out items it trained on"):
        table.add_column(col)
    for version, m in scores.items():
        warm = "unrecorded" if m["warm_items"] is None else str(m["warm_items"])
        table.add_row(version, *(f"{m[k]:.4f}" for k in REPORTED), f"[red]{warm}[/]" if m["warm_items"] else warm)
    console.print(table)
    console.print(f"tagged {len(scores)} version(s) with their own metrics (promote compares them on this split)")


@app.command("promote")
def promote_command(
    version: Annotated[str, typer.Argument(help="Registered version of onetower-encoder to serve.")],
    index_root: IndexRootOpt = INDEX_ROOT.default,
    alias: Annotated[str, typer.Option(help="The alias the service follows.")] = DEFAULT_ALIAS,
    metric: Annotated[str, typer.Option(help="Recorded metric that must not get worse.")] = DEFAULT_METRIC,
    force: Annotated[bool, typer.Option(help="Promote even if the metric is worse or missing.")] = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Move the serving alias to VERSION once its index is published and it evaluates at least as well.

    Example:  onetower promote 7 --index-root ./index

    Services following the alias swap model and index together within their poll interval.
    """
    use_tracking(tracking_uri, Path.cwd())
    try:
        move = promote(version, index_root, alias=alias, metric=metric, force=force)
    except PromotionError as e:
        console.print(f"[red]not promoted[/]: {e}")
        raise typer.Exit(1) from None
    console.print(f"@{move.alias}: version {move.previous} -> {move.current} (index {move.index_version})")


@app.command("rollback")
def rollback_command(
    index_root: IndexRootOpt = INDEX_ROOT.default,
    alias: Annotated[str, typer.Option(help="The alias the service follows.")] = DEFAULT_ALIAS,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Move the serving alias back to the version that held it before (its index is kept on disk)."""
    use_tracking(tracking_uri, Path.cwd())
    try:
        move = rollback(index_root, alias=alias)
    except PromotionError as e:
        console.print(f"[red]not rolled back[/]: {e}")
        raise typer.Exit(1) from None
    console.print(f"@{move.alias}: version {move.previous} -> {move.current} (index {move.index_version})")


# long: typer declares each option in the signature; the body is parse -> call -> print
@app.command("refresh")
def refresh_command(
    catalog: CatalogOpt,
    interactions: InteractionsOpt,
    index_root: IndexRootOpt = INDEX_ROOT.default,
    workdir: Annotated[Path, typer.Option(help="State file, split, checkpoints, candidate; rerun to resume.")]
    = Path("refresh"),
    holdout: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Held-out interactions (else --holdout-items); events on items the "
                                          "champion trained on are dropped.")] = None,
    holdout_items: Annotated[float, typer.Option(
        help="Hold out this fraction of the items as cold, drawn only from items new since the champion was "
             "trained (never in its training interactions).")] = 0.1,
    config: TrainConfigOpt = TRAIN_CONFIG.default,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Fine-tuning steps (default: the config's).")]
    = None,
    model_name: Annotated[str, typer.Option(help="Registered model.")] = MODEL_NAME,
    alias: Annotated[str, typer.Option(help="The alias the service follows.")] = DEFAULT_ALIAS,
    metric: Annotated[str, typer.Option(help=f"Decides promotion: one of {', '.join(REPORTED)}.")]
    = DEFAULT_METRIC,
    force: Annotated[bool, typer.Option(
        help="Promote even if the candidate evaluates worse, or if no item is new to the champion (then both "
             "are scored on a random, warm holdout, and the summary says so).")] = False,
    dry_run: Annotated[bool, typer.Option(help="Fine-tune and evaluate only: register, publish, promote nothing.")]
    = False,
    tracking_uri: TrackingOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Fine-tune the champion on the latest interactions; evaluate, register, reindex, promote if no worse.

    The job to schedule (cron, Airflow). Example:

        onetower refresh --catalog data/catalog.parquet --interactions data/interactions.parquet \\
            --index-root index --workdir refresh-2026-11-25

    Each finished step is recorded in WORKDIR/refresh-state.json: rerun after a crash and it resumes;
    rerun a finished refresh and it only prints the summary. Exit code 0 whether or not it promoted;
    1 when no item is new since the champion was trained (nothing fair to judge it on) unless --force.
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
