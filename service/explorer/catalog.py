"""The catalog as the explorer shows it: titles and images by item id, images only from the catalog's folder.

The service holds vectors, not content, for the items of a published index, so the page reads their
titles and images from the catalog parquet (README's schema) the user passes. Read with polars here:
`service` does not import `training` (pyproject's import contracts).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


class ImageRefusedError(ValueError):
    """An image path the explorer will not serve; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class CatalogItem:
    """One row as the page needs it: text, attributes, and where each image comes from."""

    item_id: str
    title: str
    description: str
    attributes: dict[str, str]
    image_files: tuple[str, ...] = ()  # paths relative to the catalog's folder
    image_blobs: int = 0  # images stored in the parquet's `images` column
    skipped_images: int = 0  # refs the explorer cannot serve (URIs, paths outside the folder)

    @property
    def modalities(self) -> list[str]:
        has_text = bool(self.title or self.description or self.attributes)
        has_image = bool(self.image_files or self.image_blobs or self.skipped_images)
        return (["text"] if has_text else []) + (["image"] if has_image else [])


@dataclass
class CatalogView:
    """Items by id, and the files the page may fetch from the catalog's folder."""

    path: Path | None
    items: dict[str, CatalogItem] = field(default_factory=dict)
    blobs: dict[str, list[bytes]] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)  # relative paths the catalog names

    @property
    def folder(self) -> Path | None:
        return self.path.resolve().parent if self.path is not None else None

    def sample(self, n: int, seed: int = 0) -> list[CatalogItem]:
        """`n` items, those with both text and an image first (the sample shows what the page does)."""
        ids = list(self.items)
        random.Random(seed).shuffle(ids)
        ids.sort(key=lambda i: -len(self.items[i].modalities))
        return [self.items[i] for i in ids[:n]]

    def image_file(self, relative: str) -> Path:
        """The file behind `/img/file/<relative>`.

        Raises:
            ImageRefusedError: no catalog; the path leaves the catalog's folder (`..`, absolute, a symlink
                pointing out); the catalog names no such image; no such file.
        """
        folder = self.folder
        if folder is None:
            raise ImageRefusedError(404, "no_catalog", "the explorer was started without --catalog")
        resolved = (folder / relative).resolve()
        if not resolved.is_relative_to(folder):
            raise ImageRefusedError(403, "outside_catalog_folder",
                                    f"{relative!r} resolves outside the catalog's folder {folder}; refused")
        if os.path.normpath(relative) not in self.files:
            raise ImageRefusedError(404, "not_in_catalog", f"the catalog names no image {relative!r}")
        if not resolved.is_file():
            raise ImageRefusedError(404, "image_missing", f"{relative!r} is not a file under {folder}")
        return resolved


def load_catalog(path: Path | None) -> CatalogView:
    """Read the catalog parquet (None: an empty view; the page then shows ids and live items only)."""
    view = CatalogView(path)
    if path is None:
        return view
    frame = pl.read_parquet(path)
    if "item_id" not in frame.columns:
        raise ValueError(f"{path}: missing column 'item_id' (have {frame.columns})")
    folder = path.resolve().parent
    has_blobs = "images" in frame.columns
    for row in frame.iter_rows(named=True):
        item_id = str(row["item_id"])
        files, skipped = _image_files(row, folder)
        blobs = [bytes(b) for b in row.get("images") or () if b] if has_blobs else []
        if blobs:
            view.blobs[item_id] = blobs
        view.files.update(files)
        view.items[item_id] = CatalogItem(
            item_id=item_id, title=str(row.get("title") or ""), description=str(row.get("description") or ""),
            attributes=_attributes(row.get("attributes")), image_files=tuple(files), image_blobs=len(blobs),
            skipped_images=skipped)
    return view


def _image_files(row: dict[str, Any], folder: Path) -> tuple[list[str], int]:
    """The row's image paths relative to `folder` (normalised), and how many refs cannot be served."""
    refs = row.get("image_paths")
    if refs is None and row.get("image_path"):
        refs = [row["image_path"]]
    files: list[str] = []
    skipped = 0
    for ref in refs or ():
        if not ref:
            continue
        if "://" in ref and not ref.startswith("file://"):
            skipped += 1  # remote URIs: the page works offline
            continue
        local = Path(ref.removeprefix("file://"))
        relative = os.path.relpath(local, folder) if local.is_absolute() else os.path.normpath(ref)
        if relative.startswith(".."):
            skipped += 1
            continue
        files.append(relative)
    return files, skipped


def _attributes(value: Any) -> dict[str, str]:
    """Struct or JSON-string attributes -> str -> str (nulls dropped)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {"attributes": value}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}
