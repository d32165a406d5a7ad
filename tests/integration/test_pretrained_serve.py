"""The pretrained native encoder end to end: `onetower train --encoder pretrained` registers it, `reindex`
publishes its index, a real `onetower serve` process answers with it, and the MLflow pyfunc embeds like the
project's loader. The backbones' weights travel inside the registered model."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from embed.items import Item
from embed.load import load_encoder
from onetower.cli import app
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from training.data.synthetic import SynthConfig, generate
from training.lifecycle.register import DEFAULT_ALIAS, MODEL_NAME

from .conftest import free_port
from .test_process import _wait_serving

pytestmark = pytest.mark.slow
CHAMPION = f"models:/{MODEL_NAME}@{DEFAULT_ALIAS}"


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((48, 48, 3), np.uint8) + np.asarray(rgb, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.usefixtures("baselines_extra")
def test_pretrained_encoder_trains_registers_reindexes_serves_and_embeds_as_pyfunc(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", SynthConfig(n_items=80, n_users=40, image_size=32, seed=3,
                                                   preferences="crossed", preference_share=0.95, event_days=3))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    runner = CliRunner()
    try:
        trained = runner.invoke(app, ["train", "--catalog", str(data.catalog), "--interactions",
                                      str(data.interactions), "--config", "tiny", "--encoder", "pretrained",
                                      "--max-steps", "3", "--out", str(tmp_path / "runs"), "--tracking-uri", uri])
        assert trained.exit_code == 0, trained.output
        assert "registered onetower-encoder version 1" in trained.output
        indexed = runner.invoke(app, ["reindex", "--catalog", str(data.catalog), "--index-root",
                                      str(tmp_path / "index"), "--tracking-uri", uri, "--kind", "flat"])
        assert indexed.exit_code == 0, indexed.output
        mlflow.set_tracking_uri(uri)
        pyfunc = mlflow.pyfunc.load_model(CHAMPION)
        local = mlflow.artifacts.download_artifacts(artifact_uri=CHAMPION, dst_path=str(tmp_path / "download"))
    finally:
        mlflow.set_tracking_uri(before)
    items = [Item("a", title="Zorvane leather bag", description="Made of leather.", images=(_png((215, 35, 35)),)),
             Item("b", title="Brakka cotton shirt"), Item("c", images=(_png((35, 75, 215)), _png((30, 160, 60))))]
    encoder = load_encoder(Path(local))
    expected = encoder.encode(items)
    assert encoder.config.architecture == "native_pretrained" and expected.shape == (3, 256)
    rows = pd.DataFrame([{"item_id": it.item_id, "title": it.title, "description": it.description,
                          "attributes": None, "images": list(it.images)} for it in items])
    np.testing.assert_allclose(np.asarray(pyfunc.predict(rows)), expected, atol=1e-5)

    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "onetower.cli", "serve", "--model", CHAMPION, "--index-root",
                             str(tmp_path / "index"), "--tracking-uri", uri, "--port", str(port), "--poll-seconds",
                             "0", "--cache-dir", str(tmp_path / "serve-cache")],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        target = f"127.0.0.1:{port}"
        _wait_serving(target, proc, log)
        with Client(target) as client:
            info = client.info()
            assert (info.model_version, info.dim, info.item_count) == ("1", 256, 80)
            query = pd.read_parquet(data.catalog)["item_id"][0]
            neighbours = client.similar(item_ids=[query], k=5)[0]
            assert len(neighbours) == 5 and query not in {n.item_id for n in neighbours}
            response = client.embed([pb.Item(item_id=it.item_id, title=it.title, description=it.description,
                                             images=list(it.images)) for it in items])
            served = np.asarray([list(e.vector.values) for e in response.embeddings], np.float32)
            np.testing.assert_allclose(served, expected, atol=1e-4)
            assert [sorted(e.modalities) for e in response.embeddings] == [["image", "text"], ["text"], ["image"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
