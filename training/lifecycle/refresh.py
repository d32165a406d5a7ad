"""The scheduled refresh job: fine-tune the champion on the latest interactions and promote it if better.

Steps, each recorded in `workdir/refresh-state.json` once it finishes, so a rerun after a crash
skips what is done (and a rerun of a finished refresh only prints its summary again):

1. `champion`  resolve the alias (weights and the tokenizer saved with them).
2. `split`     the held-out items: items new since the champion was trained, never in its training
               interactions (recorded at registration), or a given holdout file less such items; none:
               refuse, unless `force` (a loud, warm fallback). See `training.lifecycle.holdout`.
3. `train`     Lightning fine-tune from the champion's weights with its tokenizer (resumes from the
               last checkpoint); the vocabulary stays the champion's, so ids and tokens agree.
4. `evaluate`  champion and candidate through one function (`scoring.score_encoder`), same split.
5. `register`  the candidate as a new version (no alias) with what it trained on; both versions tagged
               with their metrics and this split's fingerprint.
6. `reindex`   the catalog with the candidate; the live-write log is left whole (not folded), so the
               service keeps every acknowledged write whichever version ends up serving.
7. `promote`   `training.promote.promote` (index published and metric at least the champion's;
               `force` skips the metric). Not promoted: `CURRENT` goes back to the champion's index.

A new run (other catalog or interactions content, other model or alias) archives the finished state
and starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
import pytorch_lightning as ptl
from mlflow import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger
from rich.table import Table

from embed.load import load_encoder, load_model, save_encoder
from index.config import IndexConfig
from index.publish import find_version_for_model, read_current, set_current
from training.data.catalog import iter_items, read_catalog, read_interactions
from training.data.features import ItemFeatures
from training.evaluation.split import write_split
from training.fitting.config import TrainConfig
from training.fitting.stages import init_from
from training.fitting.train import build_trainer, recommendation_setup
from training.lifecycle.holdout import choose_holdout
from training.lifecycle.lineage import trained_items
from training.lifecycle.promote import DEFAULT_METRIC, REPORTED, PromotionError, promote
from training.lifecycle.register import DEFAULT_ALIAS, MODEL_NAME, register_encoder, resolve_model
from training.lifecycle.scoring import EvalSplit, record_scores, score_encoder
from training.reindex.job import DEFAULT_KEEP_VERSIONS, reindex

logger = logging.getLogger(__name__)

STATE_FILE = "refresh-state.json"
WORK_FOLDERS = ("split", "train", "candidate", "reindex-shards")  # one refresh's files; model-cache is shared
STEPS = ("champion", "split", "train", "evaluate", "register", "reindex", "promote")


@dataclass(frozen=True)
class RefreshConfig:
    """What one refresh reads and where it writes."""

    catalog: Path
    interactions: Path  # the latest interactions: fine-tuning data (minus the holdout)
    workdir: Path  # state file, split, checkpoints, candidate encoder, model cache
    index_root: Path
    train: TrainConfig
    holdout: Path | None = None  # held-out interactions; None: hold out items new since the champion trained
    holdout_fraction: float = 0.1
    model_name: str = MODEL_NAME
    alias: str = DEFAULT_ALIAS
    metric: str = DEFAULT_METRIC
    force: bool = False  # promote even if the metric is worse (also on a rerun after a refusal) or warm
    dry_run: bool = False  # stop after `evaluate`: nothing is registered, published or promoted
    index_config: IndexConfig = field(default_factory=IndexConfig)
    keep_versions: int = DEFAULT_KEEP_VERSIONS

    def __post_init__(self) -> None:
        if self.holdout is None and not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction={self.holdout_fraction} must be in (0, 1)")
        if self.metric not in REPORTED:
            raise ValueError(f"metric={self.metric!r} must be one of {list(REPORTED)}")


@dataclass(frozen=True)
class RefreshResult:
    """The recorded state of a refresh: one dict per finished step, and which ran in this call."""

    steps: dict[str, dict[str, Any]]
    ran: tuple[str, ...]  # steps executed by this call; the others were resumed from the state file
    seconds: float
    dry_run: bool

    @property
    def promoted(self) -> bool:
        return bool(self.steps.get("promote", {}).get("promoted", False))


def refresh(config: RefreshConfig, progress_bar: bool = False,
            on_step: Callable[[str, bool], None] | None = None) -> RefreshResult:
    """Run (or resume) the refresh described in the module docstring.

    Args:
        on_step: called with (step name, resumed) before each step.

    Raises:
        MlflowException: the alias does not resolve.
        ValueError: the data cannot be split or the catalog is off the schema.
    """
    started = time.perf_counter()
    config.workdir.mkdir(parents=True, exist_ok=True)
    state = _load_state(config)
    wanted = STEPS[:4] if config.dry_run else STEPS
    if config.force and not state["steps"].get("promote", {}).get("promoted", True):
        del state["steps"]["promote"]  # a rerun with --force after a refusal promotes
    ran: list[str] = []
    for step in wanted:
        done = step in state["steps"]
        if on_step is not None:
            on_step(step, done)
        if done:
            logger.info("refresh step %s: recorded in %s, not run again", step, STATE_FILE)
            continue
        t0 = time.perf_counter()
        record = _RUNNERS[step](config, state["steps"], progress_bar)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        state["steps"][step] = record
        _save_state(config.workdir, state)
        ran.append(step)
        logger.info("refresh step %s done in %.1fs", step, record["seconds"], extra={"step": step})
    return RefreshResult(steps=state["steps"], ran=tuple(ran), seconds=time.perf_counter() - started,
                         dry_run=config.dry_run)


def _fingerprint(config: RefreshConfig) -> dict[str, str]:
    """What makes two runs the same refresh: the input files' content and the model followed."""
    files = {"catalog": config.catalog, "interactions": config.interactions}
    if config.holdout is not None:
        files["holdout"] = config.holdout
    out = {name: _sha256(path) for name, path in files.items()}
    return {**out, "model": f"{config.model_name}@{config.alias}", "index_root": str(config.index_root.resolve()),
            "state_format": "2"}  # 2: the split records its fingerprint and fairness


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state(config: RefreshConfig) -> dict[str, Any]:
    path = config.workdir / STATE_FILE
    fingerprint = _fingerprint(config)
    if path.is_file():
        state: dict[str, Any] = json.loads(path.read_text())
        if state.get("inputs") == fingerprint:
            return state
        archived = path.with_name(f"refresh-state.{int(path.stat().st_mtime)}.json")
        path.rename(archived)
        logger.info("inputs changed since the last refresh (state kept in %s): starting over", archived)
    for stale in WORK_FOLDERS:  # a checkpoint of another refresh must not be resumed
        shutil.rmtree(config.workdir / stale, ignore_errors=True)
    return {"inputs": fingerprint, "steps": {}}


def _save_state(workdir: Path, state: dict[str, Any]) -> None:
    """Write the state atomically: a crash leaves the previous state or the new one, never half."""
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, workdir / STATE_FILE)


def _champion(config: RefreshConfig, steps: dict[str, Any], progress_bar: bool) -> dict[str, Any]:
    resolved = resolve_model(f"models:/{config.model_name}@{config.alias}", config.workdir / "model-cache")
    index_version = find_version_for_model(config.index_root, resolved.version)
    return {"version": resolved.version, "directory": str(resolved.directory), "index_version": index_version}


def _split(config: RefreshConfig, steps: dict[str, Any], progress_bar: bool) -> dict[str, Any]:
    """Hold out what neither model saw (training.lifecycle.holdout); record the split's fingerprint."""
    champion = steps["champion"]["version"]
    seen = trained_items(MlflowClient(), config.model_name, champion)
    given = read_interactions(config.holdout) if config.holdout is not None else None
    chosen = choose_holdout(read_interactions(config.interactions), given, seen, config.holdout_fraction,
                            config.train.seed, champion, config.force)
    train_path, holdout_path = write_split(chosen.train, chosen.holdout, config.workdir / "split")
    split = EvalSplit.of(_catalog_ids(config), chosen.train, chosen.holdout, chosen.description)
    return {"train": str(train_path), "holdout": str(holdout_path), "held_out": chosen.description,
            "fair": chosen.fair, "fingerprint": split.fingerprint}


def _catalog_ids(config: RefreshConfig) -> list[str]:
    return read_catalog(config.catalog)["item_id"].cast(pl.String).to_list()


def _train(config: RefreshConfig, steps: dict[str, Any], progress_bar: bool) -> dict[str, Any]:
    """Fine-tune from the champion's weights, with its tokenizer and architecture."""
    cfg = config.train
    ptl.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(Path(steps["champion"]["directory"]))
    items = list(iter_items(read_catalog(config.catalog), config.catalog.parent))
    features = ItemFeatures(items, tokenizer, model.config)
    module, loader = recommendation_setup(features, Path(steps["split"]["train"]), model.config, cfg, cfg.max_steps)
    init_from(module, model.state_dict())
    out = config.workdir / "train"
    last = out / "checkpoints" / "last.ckpt"
    run_id = (out / "run_id").read_text().strip() if (out / "run_id").is_file() else None
    mlf = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=mlflow.get_tracking_uri(),
                       run_name=f"refresh-from-v{steps['champion']['version']}", run_id=run_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_id").write_text(str(mlf.run_id))  # a rerun after a crash logs into the same run
    mlf.log_hyperparams({f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()}
                        | {"refresh.champion_version": steps["champion"]["version"]})
    trainer, _ = build_trainer(cfg.replace(devices=1, num_nodes=1, strategy="auto"), out, mlf, progress_bar)
    started = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    encoder_dir = save_encoder(config.workdir / "candidate", module.encoder, tokenizer)
    metrics = {"train_loss": loss, "train_seconds": time.perf_counter() - started}
    mlf.log_metrics(metrics, step=trainer.global_step)
    return {"encoder_dir": str(encoder_dir), "run_id": str(mlf.run_id), "steps": int(trainer.global_step),
            "resumed_from_checkpoint": last.is_file(), **metrics}


def _evaluate(config: RefreshConfig, steps: dict[str, Any], progress_bar: bool) -> dict[str, Any]:
    """Both encoders (the champion's registered one, the candidate's) through `score_encoder`, same split."""
    items = list(iter_items(read_catalog(config.catalog), config.catalog.parent))
    sp = steps["split"]
    split = EvalSplit.read([it.item_id for it in items], Path(sp["train"]), Path(sp["holdout"]), sp["held_out"])
    if split.fingerprint != sp["fingerprint"]:
        raise ValueError(f"the split files under {config.workdir / 'split'} changed since the split step")
    out: dict[str, Any] = {}
    for name, directory in (("champion", steps["champion"]["directory"]), ("candidate", steps["train"]["encoder_dir"])):
        scores = score_encoder(Path(directory), items, split, seed=config.train.seed)
        out["n_users"] = scores.pop("n_users")
        out[name] = scores
    return out


def _register(config: RefreshConfig, steps: dict[str, Any], progress_bar: bool) -> dict[str, Any]:
    ev = steps["evaluate"]
    client = MlflowClient()
    run_id = steps["train"]["run_id"]
    # a crash after registering but before the state was saved: reuse that version, do not register twice
    earlier = client.search_model_versions(f"name='{config.model_name}' and run_id='{run_id}'")
    version = str(earlier[0].version) if earlier else register_encoder(
        Path(steps["train"]["encoder_dir"]), run_id, {"train_loss": steps["train"]["train_loss"]},
        model_name=config.model_name, alias=None, trained_on=read_interactions(Path(steps["split"]["train"])))
    # promote() compares recorded tags: record the champion's score on this very split beside the candidate's
    sp = steps["split"]
    note = {"refresh": str(config.workdir.resolve()), "n_users": ev["n_users"], "held_out": sp["held_out"],
            "fair": sp["fair"]}
    for v, who in ((steps["champion"]["version"], "champion"), (version, "candidate")):
        record_scores(client, config.model_name, v, ev[who], sp["fingerprint"], note)
    return {"version": version}


def _reindex(config: RefreshConfig, steps: dict[str, Any], progress_bar: bool) -> dict[str, Any]:
    encoder = load_encoder(Path(steps["train"]["encoder_dir"]))
    result = reindex(config.catalog, encoder, config.model_name, steps["register"]["version"], config.index_root,
                     config.index_config, fold_log=False, work_dir=config.workdir / "reindex-shards",
                     keep_versions=config.keep_versions)
    return {"index_version": result.index_version, "count": result.count, "embedded": result.embedded,
            "resumed": result.resumed, "skipped": result.skipped}


def _promote(config: RefreshConfig, steps: dict[str, Any], progress_bar: bool) -> dict[str, Any]:
    version = steps["register"]["version"]
    before, after = steps["evaluate"]["champion"][config.metric], steps["evaluate"]["candidate"][config.metric]
    try:
        promote(version, config.index_root, model_name=config.model_name, alias=config.alias, metric=config.metric,
                force=config.force)
    except PromotionError as e:
        champion_index = steps["champion"]["index_version"]
        if champion_index is not None and read_current(config.index_root) != champion_index:
            set_current(config.index_root, champion_index)  # CURRENT names what serves
        return {"promoted": False, "reason": str(e)}
    ours = steps["reindex"]["index_version"]
    if read_current(config.index_root) != ours:  # a refused run put the champion's index back
        set_current(config.index_root, ours)
    why = "forced" if config.force and after < before else f"{config.metric} {after:.4f} >= {before:.4f}"
    return {"promoted": True, "reason": why}


_RUNNERS: dict[str, Callable[[RefreshConfig, dict[str, Any], bool], dict[str, Any]]] = {
    "champion": _champion, "split": _split, "train": _train, "evaluate": _evaluate, "register": _register,
    "reindex": _reindex, "promote": _promote}


def summary_table(result: RefreshResult, config: RefreshConfig) -> Table:
    """What changed: versions, metrics before and after, items reindexed, promoted or not and why."""
    s = result.steps
    table = Table(title=f"onetower refresh of {config.model_name}@{config.alias}"
                  + (" (dry run)" if result.dry_run else ""))
    table.add_column("", no_wrap=True)
    table.add_column("before (champion)", overflow="fold")
    table.add_column("after (candidate)", overflow="fold")
    cand_version = s.get("register", {}).get("version", "-")
    table.add_row("model version", s["champion"]["version"], cand_version)
    table.add_row("index version", str(s["champion"]["index_version"]), s.get("reindex", {}).get("index_version", "-"))
    ev = s.get("evaluate")
    if ev is not None:
        for key in REPORTED:
            mark = " *" if key == config.metric else ""
            delta = ev["candidate"][key] - ev["champion"][key]
            table.add_row(f"{key}{mark}", f"{ev['champion'][key]:.4f}", f"{ev['candidate'][key]:.4f} ({delta:+.4f})")
        table.add_row("evaluated users", str(ev["n_users"]), f"split {s['split']['fingerprint'][:12]}")
    if "split" in s:
        warm = "" if s["split"]["fair"] else "[red]"
        table.add_row("holdout", "", f"{warm}{s['split']['held_out']}")
    tr = s.get("train", {})
    if tr:
        table.add_row("fine-tuning", "", f"{tr['steps']} steps, loss {tr['train_loss']:.4f}, "
                                         f"{tr['train_seconds']:.1f}s")
    if "reindex" in s:
        ri = s["reindex"]
        table.add_row("items reindexed", "", f"{ri['count']} ({ri['embedded']} embedded, {ri['skipped']} skipped)")
    if "promote" in s:
        p = s["promote"]
        table.add_row(f"@{config.alias}", s["champion"]["version"],
                      f"{'[green]promoted' if p['promoted'] else '[yellow]not promoted'}[/]: {p['reason']}")
    resumed = [step for step in s if step not in result.ran]
    table.add_row("steps", f"resumed: {', '.join(resumed) or 'none'}",
                  f"ran: {', '.join(result.ran) or 'none'} in {result.seconds:.1f}s")
    return table
