"""The explorer in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) over a
real trained model: neighbour images rendered, a photograph uploaded and found among a similar item's
neighbours, refusals shown, two registered versions compared. Screenshots go to the test's tmp folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import polars as pl
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from embed.load import load_encoder, load_model, save_encoder
from index.config import IndexConfig
from service.config import Limits, ServiceConfig
from service.explorer import ExplorerConfig, start_explorer
from service.server import start_server
from training.lifecycle.register import ensure_experiment, register_encoder, tag_evaluation
from training.reindex.job import reindex

from .conftest import Trained

MODEL = "onetower-explorer-test"  # its own registered model: the session champion stays untouched
MAX_IMAGE_BYTES = 1_000_000  # the test server's limit, so an oversize upload is small to make
WAIT_S = 90


@dataclass(frozen=True)
class Explorer:
    url: str
    versions: tuple[str, str]  # (champion, candidate)
    catalog: Path
    query_id: str  # an item with a title and an image


def _browser_or_skip() -> Any:
    """Headless Chromium through chromedriver; skipped when missing, failed under CI=true (make test installs it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", driver),
                                        ("selenium", importlib.util.find_spec("selenium"))) if not found]
    if missing:
        why = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver; pip install selenium " \
              "(`make test` does both as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(driver)))


@pytest.fixture(scope="session")  # session: checked before the session's training, so a skip is quick
def browser() -> Iterator[Any]:
    driver = _browser_or_skip()
    yield driver
    driver.quit()


def _candidate(trained: Trained, folder: Path) -> Path:
    """The trained encoder with noise on every weight: another version whose neighbours differ in part."""
    model, tokenizer = load_model(trained.encoder_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5 * (p.std() if p.numel() > 1 else 0.0))
    return save_encoder(folder, model, tokenizer)


@pytest.fixture(scope="module")
def explorer(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Explorer]:
    work = tmp_path_factory.mktemp("explorer")
    mlflow.set_tracking_uri(trained.tracking_uri)
    registry = MlflowClient(trained.tracking_uri)
    run_id = registry.create_run(ensure_experiment("onetower-tests")).info.run_id
    ds, index_root = trained.dataset, work / "index"
    versions = []
    for n, encoder_dir in enumerate((trained.encoder_dir, _candidate(trained, work / "candidate"))):
        version = register_encoder(encoder_dir, run_id, {}, model_name=MODEL, alias="champion" if n == 0 else None)
        tag_evaluation(registry, MODEL, version, {"recall@20": 0.31 - 0.1 * n, "ndcg@20": 0.18 - 0.05 * n},
                       ["recall@20", "ndcg@20"], "split-fingerprint", {"note": "explorer test"})
        reindex(ds.catalog, load_encoder(encoder_dir), MODEL, version, index_root, IndexConfig(kind="flat"))
        versions.append(version)
    server = start_server(ServiceConfig(model_uri=f"models:/{MODEL}@champion", index_root=index_root,
                                        tracking_uri=trained.tracking_uri, port=0, poll_seconds=0,
                                        cache_dir=work / "cache", limits=Limits(max_image_bytes=MAX_IMAGE_BYTES)))
    url, stop = start_explorer(ExplorerConfig(target=f"127.0.0.1:{server.port}", catalog=ds.catalog, port=0,
                                              tracking_uri=trained.tracking_uri, index_root=index_root,
                                              cache_dir=work / "cache"))
    frame = pl.read_parquet(ds.catalog, columns=["item_id", "title", "image_paths"])
    query_id = str(frame.filter((pl.col("title") != "") & pl.col("image_paths").is_not_null())["item_id"][0])
    yield Explorer(url, (versions[0], versions[1]), ds.catalog, query_id)
    stop()
    server.stop(grace=1)


def _grid_ready(driver: Any, grid: str) -> list[dict[str, Any]]:
    """Wait until the grid's images have all loaded or failed; return its cards as the page shows them."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script(f"return document.getElementById('{grid}').dataset.state") == "ready")
    cards: list[dict[str, Any]] = driver.execute_script(f"""
        return [...document.querySelectorAll('#{grid} .card')].map(c => ({{
          id: c.dataset.id, images: [...c.querySelectorAll('img')].map(i => i.naturalWidth)}}));""")
    return cards


def _shot(driver: Any, folder: Path, name: str) -> None:
    driver.save_screenshot(str(folder / f"{name}.png"))


def _error_text(driver: Any) -> str:
    text: str = driver.execute_script("const e = document.getElementById('error'); return e.hidden ? '' : e.textContent")
    return text


def _photo(folder: Path) -> Path:
    """A real photograph: scikit-learn's sample `china.jpg` (MLflow brings scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.submodule_search_locations, "scikit-learn ships the sample photographs"
    source = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images" / "china.jpg"
    return Path(shutil.copy(source, folder / "china.jpg"))


def test_neighbour_images_all_render_and_the_first_grid_is_fast(browser: Any, explorer: Explorer,
                                                                tmp_path: Path) -> None:
    browser.get(explorer.url)
    sample = _grid_ready(browser, "grid")
    assert len(sample) == 24 and all(w > 0 for c in sample for w in c["images"]), sample
    _shot(browser, tmp_path, "sample")
    timings = []
    for _ in range(3):  # the first navigation loads the page's assets, the next ones find them cached
        browser.get(f"{explorer.url}?q={explorer.query_id}")
        cards = _grid_ready(browser, "grid")
        timings.append(int(browser.execute_script("return +document.getElementById('grid').dataset.readyMs")))
        assert len(cards) == 12 and explorer.query_id not in {c["id"] for c in cards}
        assert all(c["images"] and all(w > 0 for w in c["images"]) for c in cards if c["images"]), cards
        assert sum(bool(c["images"]) for c in cards) >= 6, cards  # most synthetic items have an image
    print(f"first render of a 12-neighbour grid, navigation to images loaded: {timings} ms")
    (tmp_path / "first_render_ms.json").write_text(json.dumps(timings))
    _shot(browser, tmp_path, "neighbours")
    assert min(timings) < 1000, timings


def test_a_photograph_added_to_the_catalog_shows_up_among_a_similar_items_neighbours(
        browser: Any, explorer: Explorer, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    title = pl.read_parquet(explorer.catalog).filter(pl.col("item_id") == explorer.query_id)["title"][0]
    browser.get(explorer.url)
    browser.find_element(By.CSS_SELECTOR, "[data-tab=new]").click()
    browser.find_element(By.ID, "files").send_keys(str(_photo(tmp_path)))
    browser.find_element(By.ID, "new-title").send_keys(title)
    browser.find_element(By.ID, "new-id").clear()
    browser.find_element(By.ID, "new-id").send_keys("photo-1")
    time.sleep(0.3)  # the FileReader fills the upload list
    browser.find_element(By.ID, "embed-btn").click()
    embedded = _grid_ready(browser, "new-grid")
    assert len(embedded) == 12 and "text+image" in browser.find_element(By.ID, "new-status").text
    browser.execute_script("document.getElementById('new-grid').dataset.state = ''")
    browser.find_element(By.ID, "upsert-btn").click()
    added = _grid_ready(browser, "new-grid")
    assert "added photo-1" in browser.find_element(By.ID, "new-status").text, _error_text(browser)
    _shot(browser, tmp_path, "new_item")
    similar = added[0]["id"]  # its nearest neighbour: click it and find the photograph among its neighbours
    browser.find_element(By.CSS_SELECTOR, f"#new-grid .card[data-id='{similar}']").click()
    time.sleep(0.1)
    cards = _grid_ready(browser, "grid")
    assert "photo-1" in [c["id"] for c in cards], (similar, cards)
    photo = next(c for c in cards if c["id"] == "photo-1")
    assert photo["images"] and photo["images"][0] == 640, photo  # the stored photograph, served back
    _shot(browser, tmp_path, "photo_among_neighbours")


def test_an_oversize_upload_and_a_path_traversal_are_refused_and_the_page_keeps_working(
        browser: Any, explorer: Explorer, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > MAX_IMAGE_BYTES
    browser.get(explorer.url)
    browser.find_element(By.CSS_SELECTOR, "[data-tab=new]").click()
    browser.find_element(By.ID, "files").send_keys(str(big))
    browser.find_element(By.ID, "new-title").send_keys("too big")
    time.sleep(0.5)
    browser.find_element(By.ID, "embed-btn").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(lambda d: _error_text(d))
    assert _error_text(browser) == (f"RESOURCE_EXHAUSTED: image_too_large: items[0].images[0] has "
                                    f"{big.stat().st_size} bytes, limit {MAX_IMAGE_BYTES}")
    _shot(browser, tmp_path, "oversize_refused")
    for path, status in (("img/file/%2e%2e/%2e%2e/etc/passwd", 403), ("img/file/..%2Fcatalog.parquet", 403),
                         ("img/file/catalog.parquet", 404)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(explorer.url + path, timeout=30)
        assert err.value.code == status and b'"code":"' in err.value.read()
    browser.get(f"{explorer.url}?q={explorer.query_id}")
    assert len(_grid_ready(browser, "grid")) == 12  # still serving


def test_two_registered_versions_side_by_side(browser: Any, explorer: Explorer, tmp_path: Path) -> None:
    champion, candidate = explorer.versions
    browser.get(f"{explorer.url}?tab=compare&a={champion}&b={candidate}&q={explorer.query_id}&k=12")
    a, b = _grid_ready(browser, "grid-a"), _grid_ready(browser, "grid-b")
    ids_a, ids_b = [c["id"] for c in a], [c["id"] for c in b]
    assert len(ids_a) == len(ids_b) == 12 and ids_a != ids_b
    overlap = len(set(ids_a) & set(ids_b)) / 12
    assert browser.execute_script("return document.getElementById('overlap').textContent") \
        .startswith(f"overlap@12: {overlap:.2f}")
    heads = browser.execute_script("return [1, 2].map(i => document.querySelectorAll('.columns h2')[i - 1].textContent)")
    assert heads == [f"A: version {champion} (served)", f"B: version {candidate} (read-only, pinned)"], heads
    metrics = browser.execute_script("return document.getElementById('metrics-b').textContent")
    assert "recall@20" in metrics and "0.21" in metrics, metrics
    _shot(browser, tmp_path, "compare")


def test_a_users_history_gets_recommendations(browser: Any, explorer: Explorer, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    ids = pl.read_parquet(explorer.catalog, columns=["item_id"])["item_id"].head(3).to_list()
    browser.get(explorer.url)
    browser.find_element(By.CSS_SELECTOR, "[data-tab=user]").click()
    browser.find_element(By.ID, "hist").send_keys(f"{ids[0]} 2\n{ids[1]}\n{ids[2]} 0.5")
    browser.find_element(By.CSS_SELECTOR, "#user-form button").click()
    history, recommended = _grid_ready(browser, "user-history"), _grid_ready(browser, "user-grid")
    assert [c["id"] for c in history] == ids and len(recommended) == 12
    assert not set(ids) & {c["id"] for c in recommended}
    _shot(browser, tmp_path, "user")

