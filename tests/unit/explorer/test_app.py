"""The explorer's HTTP API against a real gRPC server: cards with images, words, new items, refusals."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from service.explorer import ExplorerConfig, start_explorer
from service.server import start_server

from .conftest import MAX_IMAGE_BYTES, Explored, get_json, http, png, self_signed


def _noise_jpeg(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_the_first_page_samples_the_catalog_with_its_images(explored: Explored) -> None:
    status, info = get_json(explored.url + "api/info")
    assert status == 200, info
    assert (info["item_count"], info["catalog_items"], len(info["sample"])) == (40, 40, 24)
    assert info["sample"][0]["modalities"] == ["text", "image"]  # items with both come first
    for card in info["sample"]:
        for src in card["images"]:
            code, data, kind = http(explored.url + src.lstrip("/"))
            assert (code, kind.startswith("image/"), Image.open(io.BytesIO(data)).size) == (200, True, (40, 40)), src


def test_neighbours_of_an_id_are_cards_with_scores_and_every_image_served(explored: Explored) -> None:
    status, res = get_json(explored.url + "api/similar?q=item-001&k=12&filter=category%3Dshirt")
    assert status == 200, res
    assert res["by"] == "item_id" and res["query"]["item_id"] == "item-001"
    cards = res["neighbours"]
    assert len(cards) == 12 and "item-001" not in {c["item_id"] for c in cards}
    assert all(c["attributes"]["category"] == "shirt" for c in cards)
    assert [c["score"] for c in cards] == sorted((c["score"] for c in cards), reverse=True)
    blob = get_json(explored.url + "api/similar?q=item-003&k=3")[1]["query"]
    assert blob["images"][0].startswith("/img/blob?")  # images stored in the parquet itself
    for src in [s for c in cards for s in c["images"]] + blob["images"]:
        assert http(explored.url + src.lstrip("/"))[0] == 200, src


def test_words_are_embedded_as_a_text_only_item(explored: Explored) -> None:
    status, res = get_json(explored.url + "api/similar?" + "q=red+leather+bag&k=5")
    assert status == 200, res
    assert (res["by"], res["query"]["modalities"], len(res["neighbours"])) == ("words", ["text"], 5)


def test_a_new_item_is_embedded_then_added_and_its_content_comes_back_from_the_service(explored: Explored) -> None:
    image = png((250, 10, 10), 48)
    item = {"title": "red leather bag", "description": "dropped in", "attributes": "category=bag",
            "images": [_b64(image)], "k": 5}
    status, embedded = get_json(explored.url + "api/embed", item)
    assert status == 200, embedded
    assert embedded["modalities"] == ["text", "image"] and len(embedded["neighbours"]) == 5
    status, added = get_json(explored.url + "api/upsert", item | {"item_id": "new-unit-1"})
    assert status == 200, added
    assert added["item"]["live"] and added["item"]["title"] == "red leather bag"
    neighbour = added["neighbours"][0]["item_id"]
    found = get_json(explored.url + f"api/similar?q={neighbour}&k=39")[1]["neighbours"]
    card = next(c for c in found if c["item_id"] == "new-unit-1")  # a neighbour of its own neighbour
    assert (card["live"], card["attributes"], card["modalities"]) == (True, {"category": "bag"}, ["text", "image"])
    code, data, kind = http(explored.url + card["images"][0].lstrip("/"))
    assert (code, kind) == (200, "image/png")
    assert Image.open(io.BytesIO(data)).getpixel((3, 3)) == (250, 10, 10)  # the stored pixels


def test_a_history_gets_recommendations(explored: Explored) -> None:
    status, res = get_json(explored.url + "api/recommend", {"history": "item-001 2\nitem-002\n", "k": 6})
    assert status == 200, res
    assert [c["item_id"] for c in res["history"]] == ["item-001", "item-002"]
    assert len(res["neighbours"]) == 6 and not {"item-001", "item-002"} & {c["item_id"] for c in res["neighbours"]}


def test_the_image_route_refuses_to_leave_the_catalog_folder(explored: Explored) -> None:
    folder = explored.catalog.parent
    secret = folder.parent / "secret.png"
    secret.write_bytes(png((1, 2, 3)))
    os.symlink(secret, folder / "images" / "link.png")
    attempts = {
        "%2e%2e/secret.png": 403, "images/%2e%2e/%2e%2e/secret.png": 403, "..%2F..%2Fsecret.png": 403,
        quote(str(secret), safe=""): 403, "images/link.png": 403,  # a symlink pointing out
        "catalog.parquet": 404, "images/nope.png": 404,  # inside, but the catalog names no such image
    }
    for path, expected in attempts.items():
        status, body, _ = http(explored.url + "img/file/" + path)
        error = json.loads(body)["error"]
        assert (status, error["code"]) == (expected, "outside_catalog_folder" if expected == 403
                                           else "not_in_catalog"), (path, body)
    assert get_json(explored.url + "api/info")[0] == 200  # still serving


def test_an_oversize_upload_shows_the_services_own_refusal(explored: Explored) -> None:
    big = _noise_jpeg(500)
    assert len(big) > MAX_IMAGE_BYTES
    status, res = get_json(explored.url + "api/embed", {"title": "huge", "images": [_b64(big)]})
    assert status == 413, res
    assert res["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert res["error"]["details"] == f"image_too_large: items[0].images[0] has {len(big)} bytes, " \
                                      f"limit {MAX_IMAGE_BYTES}"
    status, res = get_json(explored.url + "api/embed", {"title": "x", "images": ["not base64!"]})
    assert (status, res["error"]["code"]) == (400, "BAD_REQUEST")
    form = urllib.request.Request(explored.url + "api/upsert", data=b'{"item_id": "csrf", "title": "x"}',
                                  headers={"content-type": "text/plain"})  # what a cross-site form can send
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(form, timeout=30)
    assert err.value.code == 400 and b"application/json" in err.value.read()
    assert get_json(explored.url + "api/similar?q=item-001&k=3")[0] == 200  # still serving


def test_the_page_and_its_assets_are_served_from_the_package(explored: Explored) -> None:
    status, page, kind = http(explored.url)
    assert (status, kind.split(";")[0]) == (200, "text/html")
    for asset in ("static/app.js", "static/style.css"):
        assert http(explored.url + asset)[0] == 200
    assert b"http://" not in page and b"https://" not in page  # no CDN, works offline


def test_tls_and_the_token_are_passed_through_and_refusals_show_the_services_status(
        explored: Explored, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = start_server(dataclasses.replace(explored.config, auth_token="s3cret", tls_cert=cert, tls_key=key,
                                              read_only=True))
    target = f"127.0.0.1:{server.port}"
    pages = [start_explorer(ExplorerConfig(target=target, port=0, timeout=5, **extra)) for extra in (
        {"token": "s3cret", "root_cert": cert.read_bytes()}, {"root_cert": cert.read_bytes()}, {"token": "s3cret"})]
    try:
        status, res = get_json(pages[0][0] + "api/similar?q=item-001&k=3")
        assert (status, len(res["neighbours"])) == (200, 3)
        assert res["neighbours"][0]["images"] == []  # no --catalog: ids and scores only
        status, res = get_json(pages[0][0] + "api/upsert", {"item_id": "x", "title": "x"})
        assert (status, res["error"]["code"], res["error"]["details"].split(":")[0]) == \
            (409, "FAILED_PRECONDITION", "read_only")
        status, res = get_json(pages[1][0] + "api/info")  # no token
        assert (status, res["error"]["code"]) == (401, "UNAUTHENTICATED")
        status, res = get_json(pages[2][0] + "api/info")  # plaintext to a TLS port
        assert (status, res["error"]["code"]) == (503, "UNAVAILABLE")
    finally:
        for _, stop in pages:
            stop()
        server.stop(grace=0)
