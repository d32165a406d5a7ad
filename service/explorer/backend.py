"""What the page asks for, answered through the public gRPC API (plus the catalog and the registry).

Every answer is a plain dict the app sends as JSON; a neighbour is a *card*: id, title, score, image
URLs and the modalities its vector is made from. No serving logic lives here: searches, embeddings and
writes are the service's; this module only names ids with their content.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import grpc

from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.explorer.catalog import CatalogView
from service.explorer.config import ExplorerConfig
from service.explorer.versions import PinnedServers, list_versions

logger = logging.getLogger(__name__)

LIVE_CACHE = 512  # live items whose content (images included) the explorer keeps for the image route
LIVE_BATCH = 256  # ids per GetLiveItems call: the service's default max_items


@dataclass(frozen=True)
class Search:
    """One neighbour query as the page states it."""

    text: str  # an item id, or words
    mode: str = "auto"  # auto: an id when the index knows it, else words; id; words
    k: int = 12
    attributes_equal: Mapping[str, str] | None = None
    min_score: float | None = None
    exclude: Sequence[str] = ()


class Explorer:
    """The page's backend: one client of the served API, the catalog, and pinned servers for compare."""

    def __init__(self, config: ExplorerConfig, catalog: CatalogView) -> None:
        self.config = config
        self.catalog = catalog
        self.client = Client(config.target, timeout=config.timeout, token=config.token, root_cert=config.root_cert)
        self._live: OrderedDict[str, pb.Item] = OrderedDict()
        self._pinned: PinnedServers | None = None

    def close(self) -> None:
        if self._pinned is not None:
            self._pinned.close()
        self.client.close()

    # ---- the first page ------------------------------------------------------------------------
    def info(self, seed: int = 0) -> dict[str, Any]:
        info = self.client.info()
        return {"model_name": info.model_name, "model_version": info.model_version, "model_alias": info.model_alias,
                "index_version": info.index_version, "item_count": info.item_count, "dim": info.dim,
                "index_kind": info.index_kind, "catalog": str(self.catalog.path or ""),
                "catalog_items": len(self.catalog.items), "k": self.config.k,
                "sample": self.cards([it.item_id for it in self.catalog.sample(self.config.sample_size, seed)])}

    # ---- neighbours ----------------------------------------------------------------------------
    def similar(self, search: Search, client: Client | None = None) -> dict[str, Any]:
        """Neighbours of an item id or of words embedded as a text-only item."""
        client = client or self.client
        by_id = search.mode == "id" or (search.mode == "auto" and self._is_item(client, search.text))
        query = pb.Query(item_id=search.text) if by_id else pb.Query(item=pb.Item(title=search.text))
        request = pb.SimilarItemsRequest(
            queries=[query], k=search.k, exclude_item_ids=list(search.exclude),
            filter=pb.Filter(attributes_equal=dict(search.attributes_equal or {})), min_score=search.min_score)
        response = client.stub.SimilarItems(request, timeout=client.timeout, metadata=client.metadata)
        hits = response.results[0].neighbors
        return {"query": self.cards([search.text])[0] if by_id else
                {"item_id": "", "title": search.text, "images": [], "modalities": ["text"], "live": False},
                "by": "item_id" if by_id else "words", "model_version": response.model_version,
                "index_version": response.index_version,
                "neighbours": self.cards([h.item_id for h in hits], [h.score for h in hits])}

    def _is_item(self, client: Client, text: str) -> bool:
        if text in self.catalog.items:
            return True
        try:
            client.stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=[text]), timeout=client.timeout,
                                      metadata=client.metadata)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return False
            raise
        return True

    def embed(self, item: pb.Item, search: Search) -> dict[str, Any]:
        """A new item's neighbours without storing it: EmbedItems, then a search by its vector."""
        embedded = self.client.embed([item])
        vector = embedded.embeddings[0]
        request = pb.SimilarItemsRequest(
            queries=[pb.Query(vector=vector.vector)], k=search.k, model_version=embedded.model_version,
            filter=pb.Filter(attributes_equal=dict(search.attributes_equal or {})), min_score=search.min_score)
        response = self.client.stub.SimilarItems(request, timeout=self.client.timeout, metadata=self.client.metadata)
        hits = response.results[0].neighbors
        return {"modalities": list(vector.modalities), "model_version": embedded.model_version,
                "neighbours": self.cards([h.item_id for h in hits], [h.score for h in hits])}

    def upsert(self, item: pb.Item, k: int) -> dict[str, Any]:
        """Add the item to the served index (a durable live write) and return its neighbours."""
        response = self.client.upsert([item], neighbors_k=k)
        self._live.pop(item.item_id, None)
        hits = response.neighbors[0].neighbors if response.neighbors else []
        return {"item": self.cards([item.item_id])[0], "model_version": response.model_version,
                "neighbours": self.cards([h.item_id for h in hits], [h.score for h in hits])}

    def recommend(self, history: Sequence[tuple[str, float | None]], k: int,
                  attributes_equal: Mapping[str, str] | None = None) -> dict[str, Any]:
        events = [pb.HistoryEvent(item_id=i, weight=w) for i, w in history]
        request = pb.RecommendForUserRequest(history=events, k=k,
                                             filter=pb.Filter(attributes_equal=dict(attributes_equal or {})))
        response = self.client.stub.RecommendForUser(request, timeout=self.client.timeout,
                                                     metadata=self.client.metadata)
        hits = response.neighbors
        return {"history": self.cards([i for i, _ in history]), "model_version": response.model_version,
                "neighbours": self.cards([h.item_id for h in hits], [h.score for h in hits])}

    # ---- two versions ----------------------------------------------------------------------------
    def versions(self) -> dict[str, Any]:
        info = self.client.info()
        found = list_versions(info.model_name, self.config.tracking_uri, self.config.index_root)
        return {"model_name": info.model_name, "served_version": info.model_version,
                "versions": [vars(v) | {"aliases": list(v.aliases)} for v in found]}

    def compare(self, a: str, b: str, search: Search) -> dict[str, Any]:
        """The same query answered by version `a` and version `b`, each from its own encoder and index."""
        served = self.client.info().model_version
        sides: dict[str, dict[str, Any]] = {}
        for side, version in (("a", a), ("b", b)):
            try:
                client = self.client if version == served else self._pinned_servers(self.client).client(version)
                sides[side] = self.similar(search, client) | {"version": version, "served": version == served}
            except grpc.RpcError as e:
                sides[side] = {"version": version, "error": rpc_error(e), "neighbours": []}
            except Exception as e:  # noqa: BLE001 - a version that cannot be served is shown, not raised
                logger.warning("compare: version %s cannot be served: %s", version, e)
                sides[side] = {"version": version, "neighbours": [],
                               "error": {"code": "NOT_SERVABLE", "details": str(e).splitlines()[0][:500]}}
        ids = [[n["item_id"] for n in sides[s]["neighbours"]] for s in ("a", "b")]
        shared = sorted(set(ids[0]) & set(ids[1]))
        return {"a": sides["a"], "b": sides["b"], "k": search.k, "shared": shared,
                "overlap": len(shared) / search.k}

    def _pinned_servers(self, client: Client) -> PinnedServers:
        if self._pinned is None:
            self._pinned = PinnedServers(client.info().model_name, self.config.tracking_uri, self.config.index_root,
                                         self.config.cache_dir, self.config.timeout)
        return self._pinned

    # ---- cards and images ------------------------------------------------------------------------
    def cards(self, ids: Sequence[str], scores: Sequence[float] | None = None) -> list[dict[str, Any]]:
        """What the page shows of each id: live content (GetLiveItems) first, else the catalog's."""
        live = self.live_items(ids)
        out = []
        for n, item_id in enumerate(ids):
            card = _live_card(live[item_id]) if item_id in live else self._catalog_card(item_id)
            if scores is not None:
                card["score"] = round(float(scores[n]), 4)
            out.append(card)
        return out

    def _catalog_card(self, item_id: str) -> dict[str, Any]:
        item = self.catalog.items.get(item_id)
        if item is None:
            return {"item_id": item_id, "title": "", "images": [], "modalities": [], "live": False}
        images = ["/img/file/" + quote(f) for f in item.image_files]
        images += [f"/img/blob?{urlencode({'id': item_id, 'n': j})}" for j in range(item.image_blobs)]
        return {"item_id": item_id, "title": item.title, "description": item.description[:300],
                "attributes": item.attributes, "images": images, "modalities": item.modalities, "live": False}

    def live_items(self, ids: Sequence[str]) -> dict[str, pb.Item]:
        """The stored content of those `ids` that were written live; remembered for the image route."""
        wanted = list(dict.fromkeys(ids))
        found: dict[str, pb.Item] = {}
        for start in range(0, len(wanted), LIVE_BATCH):
            request = pb.GetLiveItemsRequest(item_ids=wanted[start:start + LIVE_BATCH])
            response = self.client.stub.GetLiveItems(request, timeout=self.client.timeout,
                                                     metadata=self.client.metadata)
            found.update({it.item_id: it for it in response.items})
        for item_id, item in found.items():
            self._live[item_id] = item
            self._live.move_to_end(item_id)
        while len(self._live) > LIVE_CACHE:
            self._live.popitem(last=False)
        return found

    def live_image(self, item_id: str, n: int) -> bytes | None:
        item = self._live.get(item_id) or self.live_items([item_id]).get(item_id)
        return bytes(item.images[n]) if item is not None and 0 <= n < len(item.images) else None


def _live_card(item: pb.Item) -> dict[str, Any]:
    version = hashlib.sha256(b"".join(item.images)).hexdigest()[:10]  # a new upsert: a new URL
    has_text = bool(item.title or item.description or item.attributes)
    return {"item_id": item.item_id, "title": item.title, "description": item.description[:300],
            "attributes": dict(item.attributes), "live": True,
            "images": [f"/img/live?{urlencode({'id': item.item_id, 'n': j, 'v': version})}"
                       for j in range(len(item.images))],
            "modalities": (["text"] if has_text else []) + (["image"] if item.images else [])}


def rpc_error(error: grpc.RpcError) -> dict[str, str]:
    """The service's status and its own reason, as the page shows them."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return {"code": code.name, "details": details or ""}
