"""Request parsing: protobuf messages -> library values, refusing bad fields by name."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from embed.images import image_pixels
from embed.items import Item
from index.config import MAX_EF_SEARCH, MAX_NPROBE, SearchParams
from index.ids import MAX_ITEM_ID_BYTES
from protos.onetower.v1 import onetower_pb2 as pb
from service.config import Limits
from service.errors import exhausted, invalid


def check_ids(ids: Iterable[str], field: str, limit: int, allow_empty: bool = False) -> list[str]:
    """Item ids (`check_item_id` each), at most `limit` of them; none only when `allow_empty`."""
    out = list(ids)
    if not out and not allow_empty:
        raise invalid("ids_empty", f"{field} is empty; send at least one item id")
    if len(out) > limit:
        raise exhausted("too_many_ids", f"{field} has {len(out)} ids, limit {limit}")
    for i, item_id in enumerate(out):
        check_item_id(item_id, field if len(out) == 1 and not field.endswith("s") else f"{field}[{i}]")
    return out


def check_item_id(item_id: str, where: str) -> None:
    """Non-empty, at most MAX_ITEM_ID_BYTES of UTF-8, printable (`str.isprintable`: no control, format,
    bidi-override, zero-width, surrogate, private-use, unassigned or separator characters but the space)."""
    if not item_id:
        raise invalid("item_id_empty", f"{where} is empty")
    size = len(item_id.encode("utf-8", "surrogatepass"))
    if size > MAX_ITEM_ID_BYTES:
        raise invalid("item_id_too_long", f"{where} is {size} bytes, limit {MAX_ITEM_ID_BYTES}")
    if not item_id.isprintable():
        bad = next(c for c in item_id if not c.isprintable())
        raise invalid("item_id_unprintable", f"{where} holds the character U+{ord(bad):04X} "
                                             f"({unicodedata.name(bad, 'unnamed')}); item ids must be printable")


def parse_items(items: Sequence[pb.Item], limits: Limits, need_id: bool, field: str = "items") -> list[Item]:
    """Protobuf items -> `Item`s, checking counts, ids, text length and image sizes (decoding comes later)."""
    single = not field.endswith("items")
    if not items:
        raise invalid("items_empty", f"{field} is empty; send at least one item")
    if len(items) > limits.max_items:
        raise exhausted("too_many_items", f"{field} has {len(items)} items, limit {limits.max_items}")
    out: list[Item] = []
    seen: dict[str, int] = {}
    for i, msg in enumerate(items):
        where = field if single else f"{field}[{i}]"
        if need_id:
            check_ids([msg.item_id], f"{where}.item_id", 1)
            if msg.item_id in seen:
                raise invalid("item_id_duplicate",
                              f"{where}.item_id {msg.item_id!r} repeats {field}[{seen[msg.item_id]}]")
            seen[msg.item_id] = i
        text_chars = len(msg.title) + len(msg.description) + sum(len(k) + len(v) for k, v in msg.attributes.items())
        if text_chars > limits.max_text_chars:
            raise invalid("text_too_long", f"{where}.title/description/attributes hold {text_chars} characters, "
                                           f"limit {limits.max_text_chars}")
        if len(msg.images) > limits.max_images_per_item:
            raise invalid("too_many_images", f"{where}.images has {len(msg.images)} images, "
                                             f"limit {limits.max_images_per_item}")
        for j, data in enumerate(msg.images):
            if len(data) > limits.max_image_bytes:
                raise exhausted("image_too_large", f"{where}.images[{j}] has {len(data)} bytes, "
                                                   f"limit {limits.max_image_bytes}")
        item = Item(item_id=msg.item_id, title=msg.title, description=msg.description,
                    attributes=dict(msg.attributes), images=tuple(msg.images))
        if not item.has_text and not item.images:
            raise invalid("item_empty", f"{where} has neither text (title, description, attributes) nor images")
        out.append(item)
    return out


def parse_vector(values: Sequence[float], dim: int, field: str) -> np.ndarray:
    """A query vector: `dim` finite values, not all zero, of any scale; returned unit-length float32."""
    vec = np.asarray(values, dtype=np.float64)
    if vec.shape != (dim,):
        raise invalid("dim_mismatch", f"{field} has {vec.size} values, want {dim}")
    if not np.isfinite(vec).all():
        raise invalid("vector_not_finite", f"{field} holds NaN or infinite values")
    peak = float(np.abs(vec).max())
    if peak == 0.0:
        raise invalid("vector_zero", f"{field} is all zeros; cannot rank by cosine")
    vec = vec / peak  # scaled first, so 1e-30 does not underflow nor 1e38 overflow the norm
    return (vec / np.linalg.norm(vec)).astype(np.float32)


def parse_min_score(request: pb.SimilarItemsRequest) -> float | None:
    """The score floor: None when unset; a set value must be a cosine in [-1, 1]."""
    if not request.HasField("min_score"):
        return None
    value = request.min_score
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise invalid("min_score_invalid", f"min_score={value} must be a number in [-1, 1] (or unset: no floor)")
    return value


def check_pixels(items: Sequence[Item], limit: int, field: str = "items") -> None:
    """Refuse a request whose images would decode to more than `limit` pixels in all (read from headers)."""
    total = 0
    for i, item in enumerate(items):
        for j, data in enumerate(item.images):
            total += image_pixels(data)
            if total > limit:
                raise exhausted("request_pixels_too_many",
                                f"{field}[{i}].images[{j}] brings the request to {total} decoded pixels, limit "
                                f"{limit}; send the images in several requests or smaller")


def parse_search_params(msg: pb.SearchParams, field: str = "search") -> SearchParams | None:
    """Per-request search effort: 0 keeps the index default; out of range is refused by field name."""
    for name, value, limit in (("ef_search", msg.ef_search, MAX_EF_SEARCH), ("nprobe", msg.nprobe, MAX_NPROBE)):
        if not 0 <= value <= limit:
            raise invalid("search_param_out_of_range",
                          f"{field}.{name}={value} must be in [0, {limit}] (0: the index default)")
    if not msg.ef_search and not msg.nprobe:
        return None
    return SearchParams(ef_search=msg.ef_search or None, nprobe=msg.nprobe or None)
