"""`onetower evaluate`, `promote` and `rollback`: the model lifecycle commands of ML teams."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from mlflow import MlflowClient
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from training.data.catalog import read_interactions
from training.data.features import count_pairs
from training.data.synthetic import PRESETS, generate
from training.evaluation.metrics import DEFAULT_KS
from training.evaluation.run import MODELS, EvalData, Recipe, run_evaluation
from training.fitting.config import data_budget, load_train_config
from training.lifecycle.promote import DEFAULT_METRIC, REPORTED, PromotionError, promote, rollback
from training.lifecycle.register import DEFAULT_ALIAS, MODEL_NAME, ensure_experiment, tag_evaluation
from training.lifecycle.tracking import log_evaluation, use_tracking

console = Console()
app = typer.Typer(no_args_is_help=True, add_completion=False)

EVAL_CONFIGS = {"small": "eval-small", "medium": "eval-medium", "tiny": "tiny", "conjunction": "eval-conjunction"}  # training config of each preset's models
TrackingOpt = Annotated[str | None, typer.Option(envvar="MLFLOW_TRACKING_URI",
                                                 help="MLflow URI (default: sqlite:///mlflow.db here).")]
IndexRootOpt = Annotated[Path, typer.Option(envvar="ONETOWER_INDEX_ROOT", help="Published index folder.")]


# long: typer declares each option in the signature; the body is parse -> call -> print
@app.command()
def evaluate(
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, report.md and the plots.")] = Path("eval"),
    preset: Annotated[str | None, typer.Option(help="Synthetic preset: small, medium or tiny (generated under OUT/data).")]
    = None,
    data: Annotated[Path | None, typer.Option(help="A dataset folder in the `onetower synth` layout.")] = None,
    catalog: Annotated[Path | None, typer.Option(help="Your catalog parquet (with --interactions).")] = None,
    interactions: Annotated[Path | None, typer.Option(help="Your interactions parquet.")] = None,
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
        help="Tag this registered version with the native model's metrics (used by promote).")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Cold-start evaluation: native vs text-only, image-only, stitched, pretrained stitched, popularity, random.

    Examples:

        onetower evaluate --preset small --out eval-small

        onetower evaluate --catalog my/catalog.parquet --interactions my/events.parquet --holdout-items 0.1

    Writes OUT/metrics.json, OUT/report.md and PNG plots (recall@K with 95% bootstrap intervals,
    a 2D projection of item embeddings, a neighbour gallery of cold items), and logs them to MLflow.
    stitched_pretrained needs the optional `baselines` extra; without it, it is reported as skipped.
    """
    _, artifact_root = use_tracking(tracking_uri, Path.cwd())
    train_config = load_train_config(config or EVAL_CONFIGS.get(preset or "", "tiny" if catalog is None else "eval-small"))
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
    if register_version is not None and "native" in result["models"]:
        tag_evaluation(MlflowClient(), MODEL_NAME, register_version, result["models"]["native"], REPORTED,
                       {"out": str(out.resolve()), "preset": preset})
        console.print(f"tagged {MODEL_NAME} version {register_version} with its metrics")


@app.command("promote")
def promote_command(
    version: Annotated[str, typer.Argument(help="Registered version of onetower-encoder to serve.")],
    index_root: IndexRootOpt = Path("index"),
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
    index_root: IndexRootOpt = Path("index"),
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
