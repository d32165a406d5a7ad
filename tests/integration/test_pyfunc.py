"""The registered encoder as an MLflow pyfunc model: same vectors as `embed.load`, loaded without unpickling."""

from __future__ import annotations

import io
import json
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from PIL import Image

from embed.config import preset
from embed.items import Item
from embed.load import WEIGHTS_FILE, load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from training.lifecycle.register import DEFAULT_ALIAS, MODEL_NAME, ensure_experiment, register_encoder

CHAMPION = f"models:/{MODEL_NAME}@{DEFAULT_ALIAS}"
TEXTS = ["red leather handbag with gold zip", "blue cotton shirt, slim fit", "green wool scarf for winter",
         "black leather boots with laces", "white cotton socks, pack of five"] * 4


def _png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# text only, image only, both, two images, attributes only: every path through the pyfunc's frame parsing
ROWS: list[dict[str, Any]] = [
    {"item_id": "a", "title": "red leather handbag", "description": "gold zip", "attributes": {"brand": "acme"},
     "images": []},
    {"item_id": "b", "title": "", "description": None, "attributes": None, "images": [_png(1)]},
    {"item_id": "c", "title": "blue cotton shirt", "description": "slim fit", "attributes": {"size": "m"},
     "images": [_png(2)]},
    {"item_id": "d", "title": "green wool scarf", "description": None, "attributes": None,
     "images": [_png(3), _png(4)]},
    {"item_id": "e", "title": "", "description": "", "attributes": {"material": "cotton", "colour": "white"},
     "images": []},
]


def _items() -> list[Item]:
    return [Item(item_id=r["item_id"], title=r["title"], description=r["description"] or "",
                 attributes=dict(r["attributes"] or {}), images=tuple(r["images"])) for r in ROWS]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny MoE encoder (random weights, trained tokenizer) registered as @champion in a sqlite store."""
    root = tmp_path_factory.mktemp("pyfunc")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = ensure_experiment("pyfunc-tests", root / "artifacts")
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = UnifiedEncoder(preset("tiny", vocab_size=tokenizer.vocab_size, moe_experts=2, moe_every=2))
    with torch.no_grad():  # non-trivial output normalisation, as after training
        model.out_norm.running_mean.normal_(0, 0.1)
        model.out_norm.running_var.uniform_(0.5, 2.0)
    encoder_dir = save_encoder(root / "encoder", model, tokenizer)
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    assert register_encoder(encoder_dir, run.info.run_id, {"recall@20": 0.5}) == "1"
    yield encoder_dir
    mlflow.set_tracking_uri(before)


class _Unpickled(RuntimeError):
    pass


@pytest.fixture()
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every unpickling entry point raises, and an audit hook records any class a pickle names."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _Unpickled("something was unpickled")

    import cloudpickle

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (pickle, "_Unpickler"),
                         (cloudpickle, "load"), (cloudpickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    found: list[str] = []
    armed = [True]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if armed[0] and event == "pickle.find_class":  # raised by the C and Python unpicklers alike
            found.append(f"{args[0]}.{args[1]}")

    sys.addaudithook(hook)  # cannot be removed; disarmed below
    yield found
    armed[0] = False


def test_pyfunc_embeds_pandas_and_polars_frames_like_the_projects_loader(registered: Path) -> None:
    expected = load_encoder(registered).encode(_items())
    model = mlflow.pyfunc.load_model(CHAMPION)
    from_pandas = np.asarray(model.predict(pd.DataFrame(ROWS)))
    frame = pl.DataFrame(
        [{**r, "attributes": json.dumps(r["attributes"]) if r["attributes"] else None} for r in ROWS],
        schema={"item_id": pl.String, "title": pl.String, "description": pl.String, "attributes": pl.String,
                "images": pl.List(pl.Binary)})
    from_polars = np.asarray(model.predict(frame))
    assert expected.shape == (len(ROWS), 64) and expected.dtype == np.float32
    assert from_pandas.dtype == from_polars.dtype == np.float32
    assert np.allclose(from_pandas, expected, atol=1e-6, rtol=0), np.abs(from_pandas - expected).max()
    assert np.allclose(from_polars, expected, atol=1e-6, rtol=0), np.abs(from_polars - expected).max()
    assert len({tuple(np.round(v, 4)) for v in expected}) == len(ROWS)  # five different items, five vectors


def test_the_registered_version_holds_safetensors_and_loads_without_unpickling(
        registered: Path, no_unpickling: list[str], tmp_path: Path) -> None:
    with pytest.raises(_Unpickled):  # the guards are live: a real pickle is refused...
        pickle.loads(pickle.dumps(Path("x")))
    model = mlflow.pyfunc.load_model(CHAMPION)
    vectors = np.asarray(model.predict(pd.DataFrame(ROWS)))
    assert vectors.shape == (len(ROWS), 64) and np.isfinite(vectors).all()
    assert no_unpickling == [], no_unpickling
    files = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path))
    names = {p.name for p in Path(files).rglob("*") if p.is_file()}
    assert WEIGHTS_FILE in names and "MLmodel" in names
    assert not {n for n in names if n.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt"))}, names


def test_the_audit_hook_sees_an_unpickled_class(no_unpickling: list[str]) -> None:
    import _pickle  # the C unpickler, behind the patched names: the hook must still see it

    _pickle.loads(_pickle.dumps(Path("x")))
    assert any("Path" in name for name in no_unpickling), no_unpickling
