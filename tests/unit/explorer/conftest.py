"""The explorer over a real gRPC server (untrained tiny encoder, published flat index) and a catalog parquet on disk."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from embed.config import preset
from embed.items import Item
from embed.load import load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from index.config import IndexConfig
from index.ids import IdMap
from index.publish import publish_index
from service.config import Limits, ServiceConfig
from service.explorer import ExplorerConfig, start_explorer
from service.registry import lookup_model
from service.server import RunningServer, start_server

N_ITEMS = 40
BLOB_ITEMS = {"item-003", "item-004"}  # images inside the parquet (`images` column), not files
MAX_IMAGE_BYTES = 200_000


def png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Explored:
    url: str  # the explorer's, ending in "/"
    server: RunningServer
    catalog: Path
    items: list[Item]
    config: ServiceConfig  # the server's


def _items() -> list[Item]:
    rng = np.random.default_rng(0)
    words = ["red", "blue", "leather", "cotton", "bag", "shirt", "lamp", "mug"]
    return [Item(item_id=f"item-{i:03d}", title=" ".join(rng.choice(words, 3)) if i % 7 else "",
                 attributes={"category": ["bag", "shirt", "lamp"][i % 3]},
                 images=(png(tuple(int(c) for c in rng.integers(0, 255, 3))),) if i % 5 else ())
            for i in range(N_ITEMS)]


def _write_catalog(folder: Path, items: list[Item]) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = []
    for it in items:
        paths = None
        if it.images and it.item_id not in BLOB_ITEMS:
            (folder / "images" / f"{it.item_id}.png").write_bytes(it.images[0])
            paths = [f"images/{it.item_id}.png"]
        rows.append({"item_id": it.item_id, "title": it.title, "description": None,
                     "attributes": json.dumps(it.attributes), "image_paths": paths,
                     "images": list(it.images) if it.item_id in BLOB_ITEMS else None})
    path = folder / "catalog.parquet"
    pl.DataFrame(rows, schema={"item_id": pl.String, "title": pl.String, "description": pl.String,
                               "attributes": pl.String, "image_paths": pl.List(pl.String),
                               "images": pl.List(pl.Binary)}).write_parquet(path)
    return path


@pytest.fixture(scope="package")
def explored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Explored]:
    root = tmp_path_factory.mktemp("explorer")
    items = _items()
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train([it.text for it in items], 300, min_frequency=1)
    encoder_dir = save_encoder(root / "encoder", UnifiedEncoder(preset("tiny", vocab_size=tokenizer.vocab_size)),
                               tokenizer)
    vectors = load_encoder(encoder_dir).encode(items)
    ids = IdMap([it.item_id for it in items], [it.content_hash() for it in items],
                [dict(it.attributes) for it in items])
    ref = lookup_model(str(encoder_dir))
    publish_index(root / "index", vectors, ids, IndexConfig(kind="flat"), ref.name, ref.version)
    catalog = _write_catalog(root / "data", items)
    config = ServiceConfig(model_uri=str(encoder_dir), index_root=root / "index", port=0, poll_seconds=0,
                           cache_dir=root / "cache", limits=Limits(max_image_bytes=MAX_IMAGE_BYTES))
    server = start_server(config)
    url, stop = start_explorer(ExplorerConfig(target=f"127.0.0.1:{server.port}", catalog=catalog, port=0))
    yield Explored(url, server, catalog, items, config)
    stop()
    server.stop(grace=1)


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET, or of a POST of `body` as JSON; HTTP errors are returned too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def get_json(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    status, data, _ = http(url, body)
    return status, json.loads(data)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files in `folder`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
