"""The item as the encoder sees it: text fields, attributes and encoded images."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from embed.image_bytes import strip_metadata

MAX_ITEM_ID_BYTES = 256


@dataclass(frozen=True)
class Item:
    """One catalog item. Text or at least one image must be present."""

    item_id: str = ""
    title: str = ""
    description: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    images: Sequence[bytes] = ()  # encoded JPEG/PNG/WebP/GIF files

    @property
    def text(self) -> str:
        """Title, description and attributes as one string for the tokenizer."""
        parts = [self.title.strip(), (self.description or "").strip()]
        parts += [f"{k}: {v}" for k, v in sorted(self.attributes.items()) if str(v).strip()]
        return " . ".join(p for p in parts if p)

    @property
    def has_text(self) -> bool:
        return bool(self.text)

    @property
    def modalities(self) -> list[str]:
        """What a vector of this item is made from, in contract order."""
        out = ["text"] if self.has_text else []
        return out + (["image"] if self.images else [])

    def content_hash(self) -> str:
        """sha256 over everything the encoder reads; equal hashes mean equal vectors under one model."""
        h = hashlib.sha256()
        h.update(json.dumps([self.title, self.description or "", sorted(self.attributes.items())],
                            ensure_ascii=False).encode("utf-8", "surrogatepass"))
        for img in self.images:
            h.update(len(img).to_bytes(8, "little"))
            h.update(hashlib.sha256(img).digest())
        return h.hexdigest()

    def stored_form(self) -> Item:
        """This item as the live-write log stores it: each image's metadata and trailing bytes dropped, pixels
        kept (`embed.image_bytes.strip_metadata`). A reindex hashes catalog rows this way too, to tell
        whether the catalog shows a live write."""
        if not self.images:
            return self
        return dataclasses.replace(self, images=tuple(strip_metadata(data) for data in self.images))

    def to_content(self) -> dict[str, Any]:
        """Plain mapping of the content (for the live-write log)."""
        return {"title": self.title, "description": self.description or "",
                "attributes": dict(self.attributes), "images": list(self.images)}

    @classmethod
    def from_content(cls, item_id: str, content: Mapping[str, Any]) -> Item:
        return cls(item_id=item_id, title=str(content.get("title", "")),
                   description=str(content.get("description", "") or ""),
                   attributes={str(k): str(v) for k, v in dict(content.get("attributes") or {}).items()},
                   images=tuple(bytes(b) for b in content.get("images") or ()))
