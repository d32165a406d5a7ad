"""The offline commands: `synth`, `train` and `reindex` (parse the options, call the library, print the result).

The jobs they run live in the rooms of `training/`: data, fitting, lifecycle, reindex; `training/demo.py`
holds the demo's steps. Logging is configured once by the `onetower` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from mlflow.exceptions import MlflowException

from index.config import IVF_CODES, HnswStorage, IndexConfig, IndexKind, IvfCode
from onetower.settings import (
    DATA,
    DEFAULT_MODEL_URI,
    DEVICE,
    ENGINE,
    EXPERIMENT,
    HNSW_STORAGE,
    INDEX_KIND,
    INDEX_ROOT,
    IVF_CODE,
    PRECISION,
    RAY_ADDRESS,
    RUNS,
    TRAIN_CONFIG,
    CatalogOpt,
    IndexRootOpt,
    InteractionsOpt,
    ModelOpt,
    PrecisionOpt,
    TrackingOpt,
    TrainConfigOpt,
)
from training.console import console, progress_bar
from training.data.catalog import CatalogError, read_interactions
from training.data.synthetic import SynthConfig, generate
from training.demo import synth_summary
from training.fitting.config import load_train_config
from training.lifecycle.register import (
    DEFAULT_ALIAS,
    MODEL_NAME,
    ensure_experiment,
    register_encoder,
    resolve_model,
)
from training.lifecycle.tracking import use_tracking
from training.reindex.driver import Engine, RayOptions, describe_reindex, pick_device, run_reindex

app = typer.Typer(
    name="training",
    help="Offline side of onetower: make a synthetic dataset, train and register the encoder, reindex.",
    no_args_is_help=True, add_completion=False, rich_markup_mode="rich", pretty_exceptions_show_locals=False)


def _bad(param: str, error: Exception) -> typer.BadParameter:
    return typer.BadParameter(str(error), param_hint=param)


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {error}")
    return typer.Exit(1)


@app.command()
def synth(
    out: Annotated[Path, DATA.option()],
    items: Annotated[int, typer.Option(min=10, help="Catalog size.")] = SynthConfig.n_items,
    users: Annotated[int, typer.Option(min=1, help="Users with interaction histories.")] = SynthConfig.n_users,
    seed: Annotated[int, typer.Option(min=0, help="Same seed, same files.")] = SynthConfig.seed,
    image_size: Annotated[int, typer.Option(min=16, max=1024, help="Side of the rendered PNGs in pixels.")]
    = SynthConfig.image_size,
) -> None:
    """Write a synthetic catalog, rendered images and interactions with known ground truth.

    Colour, pattern and shape show only in the images; brand, material and price band only in the text;
    users like conjunctions across the two, and 10% of items are held out as cold-start items.

    Example: [cyan]onetower synth --out data --items 2000 --users 500 --seed 0[/]

    Writes catalog.parquet, interactions.parquet (training), interactions_holdout.parquet (cold items),
    traits.parquet, preferences.parquet, meta.json and images/.
    """
    config = SynthConfig(n_items=items, n_users=users, seed=seed, image_size=image_size)
    with progress_bar("rendering items", items) as advance:
        dataset = generate(out, config, advance)
    console.print(synth_summary(dataset))


# long: typer declares each option in the signature; the body is parse -> call -> print
@app.command("train")
def train_command(
    catalog: CatalogOpt,
    interactions: InteractionsOpt,
    config: TrainConfigOpt = TRAIN_CONFIG.default,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override the config's max_steps.")] = None,
    encoder: Annotated[str | None, typer.Option(
        help="Override the encoder size: tiny, demo, small, base (trained from scratch), or pretrained: frozen "
             "MiniLM and EfficientNet-Lite0 tokens under a trained fusion transformer (the baselines extra; "
             "their features are extracted once into OUT/feature-cache).")]
    = None,
    out: Annotated[Path, RUNS.option()] = RUNS.default,
    tracking_uri: TrackingOpt = None,
    experiment: Annotated[str | None, EXPERIMENT.option()] = None,
    register: Annotated[bool, typer.Option(help="Register the encoder as a new model version.")] = True,
    alias: Annotated[str, typer.Option(help="Alias to point at the new version ('' for none).")] = DEFAULT_ALIAS,
    stages: Annotated[str, typer.Option(
        help="Curriculum stages, comma-separated: 1 unimodal pretraining, 2 image-text alignment, "
             "3 recommendation. Each starts from the previous one's weights.")] = "3",
    devices: Annotated[int | None, typer.Option(
        "--trainer.devices", "--devices", min=1,
        help="Processes (CPU) or GPUs per node; > 1 trains under DDP (gloo on CPU, NCCL on GPUs).")] = None,
    num_nodes: Annotated[int | None, typer.Option(
        "--trainer.num_nodes", "--num-nodes", min=1,
        help="Machines; each runs this command (torchrun or SLURM set the ranks).")] = None,
    accelerator: Annotated[str | None, typer.Option(
        "--trainer.accelerator", "--accelerator", help="Lightning accelerator: auto, cpu, gpu.")] = None,
    strategy: Annotated[str | None, typer.Option(
        "--trainer.strategy", "--strategy",
        help="Lightning strategy (default: DDP finding unused parameters when devices x num_nodes > 1).")] = None,
    precision: Annotated[str | None, typer.Option(
        "--trainer.precision", "--precision", help="32-true, or bf16-mixed for bf16 autocast.")] = None,
) -> None:
    """Train the encoder on co-engagement, log the run to MLflow and register the result.

    Examples:

    [cyan]onetower train --catalog data/catalog.parquet --interactions data/interactions.parquet[/]

    [cyan]onetower train --catalog c.parquet --interactions i.parquet --config my.yaml --max-steps 50 --no-register[/]

    [cyan]onetower train --catalog c.parquet --interactions i.parquet --stages 1,2,3[/]  (the full curriculum)

    [cyan]onetower train --catalog c.parquet --interactions i.parquet --encoder pretrained[/]  (pretrained parts)

    [cyan]onetower train --catalog c.parquet --interactions i.parquet --trainer.devices 2 --trainer.accelerator cpu[/]
    (2 DDP processes; only rank 0 saves and registers)

    Without --tracking-uri (or ONETOWER_TRACKING_URI, MLFLOW_TRACKING_URI) runs go to ./mlflow.db with artifacts
    in ./mlartifacts.
    The new version of onetower-encoder gets the alias (default champion), which reindex and serve follow.
    """
    try:
        cfg = load_train_config(config).replace(max_steps=max_steps, encoder=encoder, experiment=experiment,
                                                devices=devices, num_nodes=num_nodes, accelerator=accelerator,
                                                strategy=strategy, precision=precision)
    except (OSError, ValueError, TypeError) as e:
        raise _bad("--config", e) from e
    wanted = tuple(int(x) for x in stages.split(",") if x.strip())
    if cfg.encoder_config().pretrained and wanted != (3,):
        raise _bad("--stages", ValueError(f"stages {stages}: stages 1-2 pretrain an encoder from scratch; the "
                                          "pretrained encoder starts from pretrained parts, so it trains stage 3 only"))
    if cfg.devices * cfg.num_nodes > 1 and cfg.strategy == "auto":
        # DDP; Lightning relaunches this command once per extra local process. Stage 1 never uses the
        # encoder's output head (it trains on hidden states), so DDP must look for unused parameters.
        cfg = cfg.replace(strategy="ddp_find_unused_parameters_true")
    uri, artifact_root = use_tracking(tracking_uri, Path.cwd())
    ensure_experiment(cfg.experiment, artifact_root)
    console.print(f"training the [bold]{cfg.encoder}[/] encoder for {cfg.max_steps} steps; tracking at {uri}")
    from training.fitting.curriculum import run_stages
    from training.fitting.train import describe_training, train

    try:
        if wanted == (3,):
            result = train(catalog.resolve(), interactions.resolve(), out.resolve(), cfg, progress_bar=True)
        else:
            result = run_stages(catalog.resolve(), interactions.resolve(), out.resolve(), cfg, stages=wanted,
                                progress_bar=True)
    except CatalogError as e:
        raise _fail(e) from e
    if not result.is_global_zero:
        return  # another DDP process: rank 0 reports and registers the one model
    console.print(describe_training(result))
    if register:
        version = register_encoder(result.encoder_dir, result.run_id, result.metrics, alias=alias or None,
                                   trained_on=read_interactions(interactions))
        console.print(f"registered [bold]{MODEL_NAME}[/] version [bold green]{version}[/]"
                      + (f" as @{alias}" if alias else ""))


# long: typer declares each option in the signature; the body is parse -> call -> print
@app.command("reindex")
def reindex_command(
    catalog: CatalogOpt,
    index_root: IndexRootOpt = INDEX_ROOT.default,
    model: ModelOpt = DEFAULT_MODEL_URI,
    tracking_uri: TrackingOpt = None,
    kind: Annotated[IndexKind, INDEX_KIND.option()] = INDEX_KIND.default,
    hnsw_storage: Annotated[HnswStorage, HNSW_STORAGE.option()] = HNSW_STORAGE.default,
    ivf_code: Annotated[IvfCode, IVF_CODE.option()] = IVF_CODE.default,
    batch_size: Annotated[int, typer.Option(min=1, help="Items per forward pass.")] = 64,
    device: Annotated[str, DEVICE.option()] = DEVICE.default,
    precision: PrecisionOpt = PRECISION.default,
    incremental: Annotated[bool, typer.Option(
        help="Re-embed only items whose content hash changed since the current index (same model version).")]
    = False,
    fold_log: Annotated[bool, typer.Option(help="Fold the live-write log into the new index, then trim what the "
                                               "catalog shows (or replaced: a row with a later updated_at).")]
    = True,
    keep_versions: Annotated[int, typer.Option(min=0, help="Published versions kept on disk (0: all).")] = 3,
    engine: Annotated[Engine, ENGINE.option()] = ENGINE.default,
    address: Annotated[str | None, RAY_ADDRESS.option()] = None,
    ray_actors: Annotated[int, typer.Option(min=1, help="--engine ray: encoder actors, one model copy each.")] = 1,
    ray_cpus: Annotated[int, typer.Option(min=1, help="--engine ray: CPUs of the local Ray (without --address).")]
    = 2,
) -> None:
    """Embed the whole catalog with a registered encoder and publish a verified index version.

    Examples:

    [cyan]onetower reindex --catalog data/catalog.parquet --index-root index[/]

    [cyan]onetower reindex --catalog c.parquet --index-root index --model models:/onetower-encoder/3 --kind hnsw[/]

    [cyan]onetower reindex --catalog c.parquet --index-root index --engine ray --ray-actors 4[/]

    The model files are cached under INDEX_ROOT/.model-cache; CURRENT moves only after the new version
    verifies, so a running service keeps serving the previous one until then.

    Live writes (UpsertItems, DeleteItems) win over catalog rows updated before them (or without
    updated_at) and stay in the log until the catalog shows them, so reindexing from a catalog that
    lags the service never undoes an acknowledged write; a row updated at or after the write replaces it.
    """
    uri, _ = use_tracking(tracking_uri, Path.cwd())
    try:
        ray = RayOptions(address, ray_actors, ray_cpus) if engine is Engine.ray else None
        resolved = resolve_model(model, index_root.resolve() / ".model-cache")
        result = run_reindex(catalog.resolve(), index_root.resolve(), resolved,
                             IndexConfig(kind=kind.value, hnsw_storage=hnsw_storage.value,
                                         **IVF_CODES[ivf_code.value]),
                             batch_size, pick_device(device), incremental=incremental, fold_log=fold_log,
                             keep_versions=keep_versions or None, ray=ray, precision=precision.value)
    except MlflowException as e:
        raise typer.BadParameter(f"{e.message} (registry at {uri}: train and register first, or pass "
                                 "--tracking-uri)", param_hint="--model") from e
    except FileNotFoundError as e:
        raise _bad("--model", e) from e
    except ValueError as e:  # a catalog off the schema, or nothing embeddable
        raise _fail(e) from e
    except RuntimeError as e:  # Ray missing, or its engine failed
        raise _fail(e) from e
    console.print(describe_reindex(result))
