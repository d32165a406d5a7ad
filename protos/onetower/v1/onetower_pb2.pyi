from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Item(_message.Message):
    __slots__ = ("item_id", "title", "description", "attributes", "images")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    description: str
    attributes: _containers.ScalarMap[str, str]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("item_id", "vector", "modalities")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    vector: Vector
    modalities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., modalities: _Optional[_Iterable[str]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("attributes_equal",)
    class AttributesEqualEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTRIBUTES_EQUAL_FIELD_NUMBER: _ClassVar[int]
    attributes_equal: _containers.ScalarMap[str, str]
    def __init__(self, attributes_equal: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("ef_search", "nprobe")
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    ef_search: int
    nprobe: int
    def __init__(self, ef_search: _Optional[int] = ..., nprobe: _Optional[int] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Neighbors(_message.Message):
    __slots__ = ("neighbors",)
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class EmbedItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class EmbedItemsResponse(_message.Message):
    __slots__ = ("embeddings", "model_version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    model_version: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items", "neighbors_k")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_K_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    neighbors_k: int
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., neighbors_k: _Optional[int] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("upserted", "model_version", "neighbors")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    model_version: str
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbors]
    def __init__(self, upserted: _Optional[int] = ..., model_version: _Optional[str] = ..., neighbors: _Optional[_Iterable[_Union[Neighbors, _Mapping]]] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("item_id", "vector", "item")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    vector: Vector
    item: Item
    def __init__(self, item_id: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., item: _Optional[_Union[Item, _Mapping]] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("queries", "k", "exclude_item_ids", "filter", "min_score", "model_version", "search")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    filter: Filter
    min_score: float
    model_version: str
    search: SearchParams
    def __init__(self, queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., min_score: _Optional[float] = ..., model_version: _Optional[str] = ..., search: _Optional[_Union[SearchParams, _Mapping]] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("results", "model_version", "index_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Neighbors]
    model_version: str
    index_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[Neighbors, _Mapping]]] = ..., model_version: _Optional[str] = ..., index_version: _Optional[str] = ...) -> None: ...

class HistoryEvent(_message.Message):
    __slots__ = ("item_id", "weight", "timestamp_ms")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    weight: float
    timestamp_ms: int
    def __init__(self, item_id: _Optional[str] = ..., weight: _Optional[float] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class RecommendForUserRequest(_message.Message):
    __slots__ = ("history", "k", "exclude_item_ids", "filter", "search")
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    history: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    filter: Filter
    search: SearchParams
    def __init__(self, history: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., search: _Optional[_Union[SearchParams, _Mapping]] = ...) -> None: ...

class RecommendForUserResponse(_message.Message):
    __slots__ = ("neighbors", "model_version", "index_version", "user_vector")
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_VECTOR_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    model_version: str
    index_version: str
    user_vector: Vector
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., model_version: _Optional[str] = ..., index_version: _Optional[str] = ..., user_vector: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class GetEmbeddingsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetEmbeddingsResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "model_alias", "index_version", "item_count", "dim", "index_kind", "pid")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ALIAS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    model_alias: str
    index_version: str
    item_count: int
    dim: int
    index_kind: str
    pid: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_alias: _Optional[str] = ..., index_version: _Optional[str] = ..., item_count: _Optional[int] = ..., dim: _Optional[int] = ..., index_kind: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class GetLiveItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetLiveItemsResponse(_message.Message):
    __slots__ = ("items", "missing_item_ids")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    missing_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., missing_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...
