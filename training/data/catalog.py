"""Catalog and interaction tables (polars) in the DESIGN.md schema, and items read from them."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.fs as pafs

from embed.items import Item

logger = logging.getLogger(__name__)

MODALITIES = ("both", "text", "image")  # what an encoder is trained and embedded on
EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "like": 3.0, "purchase": 5.0}


class CatalogError(ValueError):
    """A catalog or interactions file that does not follow the schema."""


def read_catalog(path: Path) -> pl.DataFrame:
    """Read a catalog parquet and normalise it.

    Returns a frame with `item_id`, `title`, `description`, `attributes` (JSON string),
    `image_refs` (list of paths/URIs, possibly empty), `images` (list of binary, possibly empty)
    and `updated_at`; extra columns are kept.
    """
    df = pl.read_parquet(path)
    if "item_id" not in df.columns:
        raise CatalogError(f"{path}: missing column 'item_id' (have {df.columns})")
    df = df.with_columns(pl.col("item_id").cast(pl.String))
    if df["item_id"].null_count() or df["item_id"].is_duplicated().any():
        dupes = df.filter(pl.col("item_id").is_duplicated())["item_id"].head(3).to_list()
        raise CatalogError(f"{path}: item_id must be unique and non-null (duplicates e.g. {dupes})")
    cols: list[pl.Expr] = [
        _text_col(df, "title"),
        _text_col(df, "description"),
        _attributes_col(df),
        _image_refs_col(df),
        pl.col("images") if "images" in df.columns else pl.lit([], dtype=pl.List(pl.Binary)).alias("images"),
    ]
    cols.append(_updated_at_col(df, path))
    return df.with_columns(cols)


def _updated_at_col(df: pl.DataFrame, path: Path) -> pl.Expr:
    """`updated_at` as UTC datetimes: a datetime column (one without a zone is read as UTC), a date, ISO 8601
    text, or numbers since the epoch (seconds, ms, us or ns, told apart by the column's largest value);
    absent: all null. A reindex lets a row updated at or after a live write replace it."""
    utc = pl.Datetime("us", "UTC")
    if "updated_at" not in df.columns:
        return pl.lit(None, dtype=utc).alias("updated_at")
    dtype, col = df.schema["updated_at"], pl.col("updated_at")
    if isinstance(dtype, pl.Datetime):
        zoned = col.dt.replace_time_zone("UTC") if dtype.time_zone is None else col.dt.convert_time_zone("UTC")
        return zoned.cast(utc)
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype == pl.Null:
        return col.cast(utc)
    if dtype == pl.String:  # parsed here, once, so a bad value is refused by name
        try:
            parsed = df.select(col.str.to_datetime(time_zone="UTC", time_unit="us")).to_series()
        except pl.exceptions.PolarsError as e:
            why = str(e).strip().splitlines()[0][:200]
            raise CatalogError(f"{path}: updated_at holds text that is not ISO 8601 times in one format ({why})") \
                from None
        return pl.lit(parsed).alias("updated_at")
    if dtype.is_numeric():  # seconds, ms, us or ns since the epoch: told apart by size (years 1973-5138)
        peak = df.select(col.abs().max()).item() or 0
        unit = next(u for bound, u in ((1e11, "s"), (1e14, "ms"), (1e17, "us"), (float("inf"), "ns")) if peak < bound)
        scale = {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}[unit]
        return (col.cast(pl.Float64) * scale).round().cast(pl.Int64).cast(pl.Datetime("us")) \
            .dt.replace_time_zone("UTC").alias("updated_at")
    raise CatalogError(f"{path}: updated_at is {dtype}; want a datetime, a date, ISO 8601 text or a number "
                       "of seconds (or ms, us, ns) since the epoch")


def _text_col(df: pl.DataFrame, name: str) -> pl.Expr:
    if name not in df.columns:
        return pl.lit("").alias(name)
    return pl.col(name).cast(pl.String).fill_null("")


def _attributes_col(df: pl.DataFrame) -> pl.Expr:
    if "attributes" not in df.columns:
        return pl.lit("{}").alias("attributes")
    dtype = df.schema["attributes"]
    if isinstance(dtype, pl.Struct):
        return pl.col("attributes").struct.json_encode().fill_null("{}")
    return pl.col("attributes").cast(pl.String).fill_null("{}")


def _image_refs_col(df: pl.DataFrame) -> pl.Expr:
    if "image_paths" in df.columns:
        return pl.col("image_paths").cast(pl.List(pl.String)).fill_null([]).alias("image_refs")
    if "image_path" in df.columns:
        col = pl.col("image_path").cast(pl.String)
        return pl.when(col.is_null()).then(pl.lit([], dtype=pl.List(pl.String))) \
            .otherwise(pl.concat_list(col)).alias("image_refs")
    return pl.lit([], dtype=pl.List(pl.String)).alias("image_refs")


def parse_attributes(text: str | None) -> dict[str, str]:
    """A JSON object of attributes as str -> str (nested values are JSON-encoded)."""
    if not text:
        return {}
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise CatalogError(f"attributes is not a JSON object: {text[:80]!r} ({e})") from None
    if data is None:  # a null struct JSON-encodes as "null"
        return {}
    if not isinstance(data, dict):
        raise CatalogError(f"attributes must be a JSON object, got {type(data).__name__}")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items() if v is not None}


def read_image_ref(ref: str, base: Path) -> bytes:
    """Bytes of an image given as a local path (relative to the catalog's folder) or a URI."""
    if "://" in ref and not ref.startswith("file://"):
        fs, inner = pafs.FileSystem.from_uri(ref)
        with fs.open_input_stream(inner) as f:
            return bytes(f.read())
    path = Path(ref.removeprefix("file://"))
    return (path if path.is_absolute() else base / path).read_bytes()


def iter_items(df: pl.DataFrame, base: Path, with_images: bool = True) -> Iterator[Item]:
    """Items of a normalised catalog frame; unreadable image files are skipped with a warning."""
    for row in df.select("item_id", "title", "description", "attributes", "image_refs", "images").iter_rows():
        item_id, title, description, attributes, refs, blobs = row
        images: list[bytes] = []
        if with_images:
            images = [bytes(b) for b in blobs or []]
            for ref in refs or []:
                try:
                    images.append(read_image_ref(ref, base))
                except (OSError, ValueError) as e:
                    logger.warning("item %s: cannot read image %s: %s", item_id, ref, e)
        yield Item(item_id=item_id, title=title, description=description,
                   attributes=parse_attributes(attributes), images=tuple(images))


def read_interactions(path: Path) -> pl.DataFrame:
    """Interactions with `user_id`, `item_id`, `ts`, `event`, `weight` (defaults filled in)."""
    df = pl.read_parquet(path)
    missing = {"user_id", "item_id"} - set(df.columns)
    if missing:
        raise CatalogError(f"{path}: missing columns {sorted(missing)} (have {df.columns})")
    cols = [pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)]
    if "event" not in df.columns:
        cols.append(pl.lit("view").alias("event"))
    if "weight" not in df.columns:
        event = pl.col("event") if "event" in df.columns else pl.lit("view")
        cols.append(event.replace_strict(EVENT_WEIGHTS, default=1.0, return_dtype=pl.Float64).alias("weight"))
    if "ts" not in df.columns:
        cols.append(pl.int_range(pl.len()).cast(pl.Datetime("ms")).alias("ts"))
    return df.with_columns(cols).with_columns(pl.col("weight").cast(pl.Float64).fill_null(1.0))


def restrict_modalities(items: Iterable[Item], modalities: str) -> list[Item]:
    """Items with only the kept modality: "both" (all items, unchanged), "text" or "image".

    Dropping text clears title, description and attributes (attributes are text to the encoder);
    with one modality dropped, items left with nothing are dropped too.
    """
    if modalities not in MODALITIES:
        raise ValueError(f"modalities={modalities!r} must be one of {list(MODALITIES)}")
    if modalities == "text":
        kept = (dataclasses.replace(it, images=()) for it in items)
    elif modalities == "image":
        kept = (dataclasses.replace(it, title="", description="", attributes={}) for it in items)
    else:
        return list(items)
    return [it for it in kept if it.has_text or it.images]
