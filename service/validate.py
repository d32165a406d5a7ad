"""Request parsing: protobuf messages -> library values, refusing bad fields by name."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from embed.items import Item
from index.config import MAX_EF_SEARCH, MAX_NPROBE, SearchParams
from index.ids import MAX_ITEM_ID_BYTES
from protos.onetower.v1 import onetower_pb2 as pb
from service.config import Limits
from service.errors import exhausted, invalid


def check_ids(ids: Iterable[str], field: str, limit: int) -> list[str]:
    """Item ids: non-empty, at most MAX_ITEM_ID_BYTES, at most `limit` of them."""
    out = list(ids)
    if not out:
        raise invalid("ids_empty", f"{field} is empty; send at least one item id")
    if len(out) > limit:
        raise exhausted("too_many_ids", f"{field} has {len(out)} ids, limit {limit}")
    for i, item_id in enumerate(out):
        where = field if len(out) == 1 and not field.endswith("s") else f"{field}[{i}]"
        if not item_id:
            raise invalid("item_id_empty", f"{where} is empty")
        if len(item_id.encode()) > MAX_ITEM_ID_BYTES:
            raise invalid("item_id_too_long", f"{where} is {len(item_id.encode())} bytes, limit {MAX_ITEM_ID_BYTES}")
    return out


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
    """A query vector: `dim` finite values, not all zero; returned unit-length."""
    vec = np.asarray(values, dtype=np.float32)
    if vec.shape != (dim,):
        raise invalid("dim_mismatch", f"{field} has {vec.size} values, want {dim}")
    if not np.isfinite(vec).all():
        raise invalid("vector_not_finite", f"{field} holds NaN or infinite values")
    norm = float(np.linalg.norm(vec))
    if norm == 0.0 or not np.isfinite(norm):
        raise invalid("vector_zero", f"{field} is all zeros (or overflows); cannot rank by cosine")
    return vec / norm


def parse_search_params(msg: pb.SearchParams, field: str = "search") -> SearchParams | None:
    """Per-request search effort: 0 keeps the index default; out of range is refused by field name."""
    for name, value, limit in (("ef_search", msg.ef_search, MAX_EF_SEARCH), ("nprobe", msg.nprobe, MAX_NPROBE)):
        if not 0 <= value <= limit:
            raise invalid("search_param_out_of_range",
                          f"{field}.{name}={value} must be in [0, {limit}] (0: the index default)")
    if not msg.ef_search and not msg.nprobe:
        return None
    return SearchParams(ef_search=msg.ef_search or None, nprobe=msg.nprobe or None)
