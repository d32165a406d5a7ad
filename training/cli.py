"""The offline commands: `synth`, `train`, `reindex`, and `prepare_demo`, the whole path on an embedded default.

The only training module that reads files named by the user or the environment (YAML configs,
`ONETOWER_*` and `MLFLOW_TRACKING_URI`) and configures logging handlers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import mlflow
import polars as pl
import typer
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from embed.encoder import Precision
from embed.load import load_encoder
from index.config import IndexConfig
from index.errors import IndexVerificationError
from index.publish import load_version, read_current
from training.config import TrainConfig
from training.data import CatalogError
from training.register import (
    DEFAULT_ALIAS,
    MODEL_NAME,
    ensure_experiment,
    local_tracking_uri,
    register_encoder,
    resolve_model,
)
from training.reindex import ReindexResult, reindex
from training.synthetic import SynthConfig, SynthDataset, generate

if TYPE_CHECKING:  # Lightning (in training.train and training.curriculum) loads only for the commands that train
    from training.train import TrainResult

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")
DEFAULT_MODEL_URI = f"models:/{MODEL_NAME}@{DEFAULT_ALIAS}"
_TRACKING_ENV = ["ONETOWER_TRACKING_URI", "MLFLOW_TRACKING_URI"]
_QUIET_LOGGERS = ("alembic", "mlflow.store", "urllib3", "httpx", "git")  # chatty at INFO, useless to a user

_out = Console()  # user-facing output on stdout; logs go to stderr
app = typer.Typer(
    name="training",
    help="Offline side of onetower: make a synthetic dataset, train and register the encoder, reindex.",
    no_args_is_help=True, add_completion=False, rich_markup_mode="rich", pretty_exceptions_show_locals=False)


class IndexKind(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


class HnswStorage(str, Enum):
    flat = "flat"
    fp16 = "fp16"
    sq8 = "sq8"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class LogLevel(str, Enum):
    debug = "DEBUG"
    info = "INFO"
    warning = "WARNING"
    error = "ERROR"


def configure_logging(level: str | None = None) -> None:
    """Send log records through rich to stderr unless a handler is already there (e.g. the JSON lines
    `onetower --log-format json` installs); later calls with a level only change the level.

    Without a level the first call uses `ONETOWER_LOG_LEVEL`, else INFO.
    """
    root = logging.getLogger()
    fresh = not root.handlers
    if fresh:
        root.addHandler(RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=True))
        for quiet in _QUIET_LOGGERS:
            logging.getLogger(quiet).setLevel(logging.WARNING)
    if fresh or level is not None:
        root.setLevel((level or os.environ.get("ONETOWER_LOG_LEVEL") or "INFO").upper())


@app.callback()
def _main(log_level: Annotated[LogLevel, typer.Option(envvar="ONETOWER_LOG_LEVEL", case_sensitive=False,
                                                      help="How much to log (to stderr).")]
          = LogLevel.info) -> None:
    configure_logging(log_level.value)


def load_train_config(ref: str) -> TrainConfig:
    """Read a training YAML file, or a bundled one by name (`demo`, `tiny`, `gpu`).

    Raises:
        FileNotFoundError: `ref` is neither a file nor a bundled name.
        TypeError: the YAML is not a mapping.
        ValueError: it names unknown `TrainConfig` fields or invalid values.
    """
    path = Path(ref)
    if not path.is_file():
        bundled = CONFIG_DIR / f"{ref}.yaml"
        if not bundled.is_file():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"config {ref!r} is neither a YAML file nor a bundled config {names}")
        path = bundled
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TypeError(f"{path} must hold a mapping of TrainConfig fields, got {type(data).__name__}")
    return TrainConfig.from_dict(data)


def use_tracking(uri: str | None, workdir: Path) -> tuple[str, Path | None]:
    """Point MLflow at `uri`, or at the sqlite store in `workdir` when none is given.

    Returns:
        The tracking URI and, for a sqlite store, the local artifact folder beside the database
        (`mlartifacts`), which new experiments use; None for servers, which choose their own.
    """
    uri = uri or local_tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        return uri, Path(uri.removeprefix("sqlite:///")).parent.resolve() / "mlartifacts"
    return uri, None


@contextmanager
def progress_bar(description: str, total: int | None, out: Console | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar; yields the callback the library functions take (`advance(n)`)."""
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=out or _out) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def _bad(param: str, error: Exception) -> typer.BadParameter:
    return typer.BadParameter(str(error), param_hint=param)


def _fail(error: Exception) -> typer.Exit:
    _out.print(f"[bold red]error:[/] {error}")
    return typer.Exit(1)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(envvar="ONETOWER_DATA", help="Folder to write the dataset into.")],
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
    configure_logging()
    config = SynthConfig(n_items=items, n_users=users, seed=seed, image_size=image_size)
    with progress_bar("rendering items", items) as advance:
        dataset = generate(out, config, advance)
    _out.print(synth_summary(dataset))


def synth_summary(dataset: SynthDataset) -> Table:
    """A table of what a generated dataset holds and where."""
    traits = pl.read_parquet(dataset.traits, columns=["is_cold"])
    events = pl.scan_parquet(dataset.interactions).select(pl.len()).collect().item()
    holdout = pl.scan_parquet(dataset.holdout_interactions).select(pl.len()).collect().item()
    users = pl.scan_parquet(dataset.preferences).select(pl.col("user_id").n_unique()).collect().item()
    table = Table(title=f"synthetic dataset in {dataset.root}", show_header=False)
    for key, value in [("items", len(traits)), ("cold items", int(traits["is_cold"].sum())), ("users", users),
                       ("events", f"{events} training + {holdout} holdout"), ("catalog", dataset.catalog),
                       ("interactions", dataset.interactions), ("holdout", dataset.holdout_interactions),
                       ("ground truth", f"{dataset.traits}, {dataset.preferences}")]:
        table.add_row(key, str(value))
    return table


@app.command("train")
def train_command(
    catalog: Annotated[Path, typer.Option(envvar="ONETOWER_CATALOG", exists=True, dir_okay=False,
                                          help="Catalog parquet (DESIGN.md schema).")],
    interactions: Annotated[Path, typer.Option(envvar="ONETOWER_INTERACTIONS", exists=True, dir_okay=False,
                                               help="Interactions parquet: user_id, item_id, ts, event, weight.")],
    config: Annotated[str, typer.Option(envvar="ONETOWER_TRAIN_CONFIG",
                                        help="Training YAML file, or a bundled name: demo, tiny, gpu.")] = "demo",
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override the config's max_steps.")] = None,
    encoder: Annotated[str | None, typer.Option(help="Override the encoder size: tiny, demo, small, base.")]
    = None,
    out: Annotated[Path, typer.Option(envvar="ONETOWER_RUNS", help="Checkpoints and the saved encoder.")]
    = Path("runs"),
    tracking_uri: Annotated[str | None, typer.Option(
        envvar=_TRACKING_ENV, help="MLflow tracking URI (default: sqlite:///mlflow.db in the current folder).")]
    = None,
    experiment: Annotated[str | None, typer.Option(envvar="ONETOWER_EXPERIMENT",
                                                   help="MLflow experiment (default: the config's).")] = None,
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

    [cyan]onetower train --catalog c.parquet --interactions i.parquet --trainer.devices 2 --trainer.accelerator cpu[/]
    (2 DDP processes; only rank 0 saves and registers)

    Without --tracking-uri (or MLFLOW_TRACKING_URI) runs go to ./mlflow.db with artifacts in ./mlartifacts.
    The new version of onetower-encoder gets the alias (default champion), which reindex and serve follow.
    """
    configure_logging()
    try:
        cfg = load_train_config(config).replace(max_steps=max_steps, encoder=encoder, experiment=experiment,
                                                devices=devices, num_nodes=num_nodes, accelerator=accelerator,
                                                strategy=strategy, precision=precision)
    except (OSError, ValueError, TypeError) as e:
        raise _bad("--config", e) from e
    if cfg.devices * cfg.num_nodes > 1 and cfg.strategy == "auto":
        # DDP; Lightning relaunches this command once per extra local process. Stage 1 never uses the
        # encoder's output head (it trains on hidden states), so DDP must look for unused parameters.
        cfg = cfg.replace(strategy="ddp_find_unused_parameters_true")
    uri, artifact_root = use_tracking(tracking_uri, Path.cwd())
    ensure_experiment(cfg.experiment, artifact_root)
    _out.print(f"training the [bold]{cfg.encoder}[/] encoder for {cfg.max_steps} steps; tracking at {uri}")
    from training.curriculum import run_stages
    from training.train import train

    try:
        wanted = tuple(int(x) for x in stages.split(",") if x.strip())
        if wanted == (3,):
            result = train(catalog.resolve(), interactions.resolve(), out.resolve(), cfg, progress_bar=True)
        else:
            result = run_stages(catalog.resolve(), interactions.resolve(), out.resolve(), cfg, stages=wanted,
                                progress_bar=True)
    except CatalogError as e:
        raise _fail(e) from e
    if not result.is_global_zero:
        return  # another DDP process: rank 0 reports and registers the one model
    _print_train(result, _out)
    if register:
        version = register_encoder(result.encoder_dir, result.run_id, result.metrics, alias=alias or None)
        _out.print(f"registered [bold]{MODEL_NAME}[/] version [bold green]{version}[/]"
                      + (f" as @{alias}" if alias else ""))


def _print_train(result: TrainResult, out: Console) -> None:
    m = result.metrics
    stages = "; ".join(f"stage {n} loss {m[f'stage{n}_loss']:.4f}" for n in (1, 2, 3) if f"stage{n}_loss" in m)
    rate = f" ({m['pairs_per_second']:.0f} pairs/s)" if "pairs_per_second" in m else ""
    rate += "".join(f"; stage {n} {m[f'stage{n}_items_per_s']:.0f} items/s" for n in (1, 2, 3)
                    if f"stage{n}_items_per_s" in m)
    rate += f"; {m['items_per_s']:.0f} items/s" if "items_per_s" in m else ""
    out.print(f"final loss {m['train_loss']:.4f} in {m['train_seconds']:.1f}s{rate}"
              + (f" ({stages})" if stages else "") + f"; run {result.run_id}; encoder in {result.encoder_dir}")


@app.command("reindex")
def reindex_command(
    catalog: Annotated[Path, typer.Option(envvar="ONETOWER_CATALOG", exists=True, dir_okay=False,
                                          help="Catalog parquet to embed.")],
    index_root: Annotated[Path, typer.Option(envvar="ONETOWER_INDEX_ROOT",
                                             help="Where versions are published and CURRENT points.")],
    model: Annotated[str, typer.Option(envvar="ONETOWER_MODEL",
                                       help="models:/NAME@ALIAS, models:/NAME/VERSION or a local encoder folder.")]
    = DEFAULT_MODEL_URI,
    tracking_uri: Annotated[str | None, typer.Option(
        envvar=_TRACKING_ENV, help="MLflow tracking URI (default: sqlite:///mlflow.db in the current folder).")]
    = None,
    kind: Annotated[IndexKind, typer.Option(envvar="ONETOWER_INDEX_KIND", help="FAISS index kind.")]
    = IndexKind.auto,
    hnsw_storage: Annotated[HnswStorage, typer.Option(
        envvar="ONETOWER_HNSW_STORAGE",
        help="hnsw: the vectors the graph walks over. sq8 (8-bit codes, re-ranked against the fp32 vectors) "
             "searched 1.15-1.5x faster than flat at recall 0.95, fp16 0.93-1.33x (docs/PERFORMANCE.md).")]
    = HnswStorage.flat,
    batch_size: Annotated[int, typer.Option(min=1, help="Items per forward pass.")] = 64,
    device: Annotated[str, typer.Option(envvar="ONETOWER_DEVICE", help="cpu, cuda, or auto.")] = "auto",
    precision: Annotated[Precision, typer.Option(
        envvar="ONETOWER_PRECISION",
        help="Encoder arithmetic: fp32, bf16 (about 2x faster on CPUs with AVX-512 BF16 or AMX and on recent GPUs; "
             "vectors within ~1e-3 cosine of fp32), or auto (bf16 only where the hardware has it). Serve with "
             "the same setting.")] = Precision.fp32,
    incremental: Annotated[bool, typer.Option(
        help="Re-embed only items whose content hash changed since the current index (same model version).")]
    = False,
    fold_log: Annotated[bool, typer.Option(help="Fold the live-write log into the new index, then trim it.")]
    = True,
    keep_versions: Annotated[int, typer.Option(min=0, help="Published versions kept on disk (0: all).")] = 3,
    engine: Annotated[Engine, typer.Option(
        envvar="ONETOWER_REINDEX_ENGINE",
        help="Where items are embedded: this process, or Ray Data actors (needs the `distributed` extra).")]
    = Engine.local,
    address: Annotated[str | None, typer.Option(
        envvar="RAY_ADDRESS", help="--engine ray: an existing Ray cluster (default: a local Ray for this job).")]
    = None,
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
    """
    configure_logging()
    uri, _ = use_tracking(tracking_uri, Path.cwd())
    try:
        ray = RayOptions(address, ray_actors, ray_cpus) if engine is Engine.ray else None
        result = run_reindex(catalog.resolve(), index_root.resolve(), model,
                             IndexConfig(kind=kind.value, hnsw_storage=hnsw_storage.value),
                             batch_size, _device(device), incremental=incremental, fold_log=fold_log,
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
    _print_reindex(result, _out)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch  # only to ask for a GPU

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class RayOptions:
    """`reindex --engine ray`: a cluster address (None: a local Ray), encoder actors, local CPUs."""

    address: str | None = None
    actors: int = 1
    num_cpus: int = 2


def run_reindex(catalog: Path, index_root: Path, model_uri: str, index_config: IndexConfig,
                batch_size: int = 64, device: str = "cpu", out: Console | None = None, *, incremental: bool = False,
                fold_log: bool = True, keep_versions: int | None = 3, ray: RayOptions | None = None,
                precision: str = "fp32") -> ReindexResult:
    """Resolve `model_uri` (files cached under `index_root/.model-cache`) and reindex with a progress bar.

    With `ray`, the catalog items are embedded by Ray Data actors (`training.reindex_ray`).
    """
    resolved = resolve_model(model_uri, index_root / ".model-cache")
    encoder = load_encoder(resolved.directory, device=device, batch_size=batch_size, precision=precision)
    engine = None
    if ray is not None:
        from training.reindex_ray import RayEngine  # Ray is an optional extra

        engine = RayEngine(resolved.directory, address=ray.address, num_cpus=ray.num_cpus, actors=ray.actors,
                           batch_size=batch_size, device=device, precision=precision)
    rows = pl.scan_parquet(catalog).select(pl.len()).collect().item()
    with progress_bar(f"embedding with {resolved.name} v{resolved.version}", rows, out) as advance:
        return reindex(catalog, encoder, resolved.name, resolved.version, index_root, index_config, advance,
                       incremental=incremental, fold_log=fold_log, keep_versions=keep_versions, engine=engine)


def _print_reindex(result: ReindexResult, out: Console) -> None:
    rate = (result.count + result.skipped) / max(result.seconds, 1e-9)
    out.print(
        f"published index [bold green]{result.index_version}[/]: {result.count} items ({result.embedded} embedded, "
        f"{result.reused} reused, {result.resumed} resumed, {result.folded} live writes folded), "
        f"{result.skipped} skipped, {result.seconds:.1f}s ({rate:.0f} items/s) in {result.path}")


@dataclass(frozen=True)
class DemoArtifacts:
    """Everything the demo made: where the registry and index live, and which versions they hold."""

    tracking_uri: str
    model_uri: str
    index_root: Path
    dataset: SynthDataset
    model_version: str
    index_version: str


def prepare_demo(workdir: Path, n_items: int = 2000, n_users: int = 600, config: str = "demo",
                 max_steps: int | None = None, console: Console | None = None) -> DemoArtifacts:
    """Synthesise, train, register (@champion) and reindex inside `workdir`, reusing what is there.

    Layout: `data/` (dataset), `mlflow.db` + `mlartifacts/` (registry), `runs/` (checkpoints), `index/`.
    A second call finds the dataset (meta.json), the champion and an index published for it, and
    only checks them.
    """
    out = console or _out
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = SynthDataset.at(workdir / "data")
    if dataset.meta.is_file():
        out.print(f"reusing the dataset in {dataset.root}")
    else:
        with progress_bar("rendering items", n_items, out) as advance:
            generate(dataset.root, SynthConfig(n_items=n_items, n_users=n_users), advance)
        out.print(synth_summary(dataset))
    cfg = load_train_config(config).replace(max_steps=max_steps)
    tracking_uri, artifact_root = use_tracking(None, workdir)
    ensure_experiment(cfg.experiment, artifact_root)
    version = champion_version()
    if version is not None:
        out.print(f"reusing {MODEL_NAME} version {version} (@{DEFAULT_ALIAS})")
    else:
        out.print(f"training the [bold]{cfg.encoder}[/] encoder for {cfg.max_steps} steps")
        from training.train import train

        result = train(dataset.catalog, dataset.interactions, workdir / "runs", cfg, progress_bar=True)
        _print_train(result, out)
        version = register_encoder(result.encoder_dir, result.run_id, result.metrics)
    model_uri = f"models:/{MODEL_NAME}@{DEFAULT_ALIAS}"
    index_root = workdir / "index"
    index_version = current_index_for(index_root, version)
    if index_version is not None:
        out.print(f"reusing index {index_version} (model version {version})")
    else:
        result_ix = run_reindex(dataset.catalog, index_root, model_uri, IndexConfig(), out=out)
        _print_reindex(result_ix, out)
        index_version = result_ix.index_version
    return DemoArtifacts(tracking_uri=tracking_uri, model_uri=model_uri, index_root=index_root, dataset=dataset,
                         model_version=version, index_version=index_version)


def champion_version(model_name: str = MODEL_NAME, alias: str = DEFAULT_ALIAS) -> str | None:
    """The version `alias` points at in the active registry, or None when the model or alias is absent."""
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower():
            return None
        raise


def current_index_for(index_root: Path, model_version: str, model_name: str = MODEL_NAME) -> str | None:
    """The CURRENT index version if it verifies and was built by `model_name` `model_version`, else None."""
    if read_current(index_root) is None:
        return None
    try:
        manifest = load_version(index_root).manifest
    except IndexVerificationError as e:
        logger.warning("not reusing the current index: %s", e)
        return None
    if (manifest.model_name, manifest.model_version) != (model_name, model_version):
        return None
    return manifest.index_version


if __name__ == "__main__":  # the training commands on their own: python -m training.cli
    app()
