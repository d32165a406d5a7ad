"""The MLflow pyfunc model, logged *from code*: MLflow runs this file on load, nothing is unpickled.

Input: a pandas or polars frame with `title`, optional `description`, `attributes` (dict or JSON
string), `images` (list of encoded bytes) and/or `image_paths` (list of local paths).
Output: float32 array (n, embed_dim) of unit vectors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

from embed.items import Item
from embed.load import load_encoder


def _missing(value: Any) -> bool:
    """None, or the NaN pandas puts in a missing cell of an object column."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def _text(value: Any) -> str:
    return "" if _missing(value) else str(value)


def _attributes(value: Any) -> dict[str, str]:
    if _missing(value):
        return {}
    data = json.loads(value) if isinstance(value, str) else dict(value)
    return {str(k): str(v) for k, v in data.items() if v is not None}


def _list(value: Any) -> list[Any]:
    if _missing(value):
        return []
    return list(value)


def _images(row: dict[str, Any]) -> tuple[bytes, ...]:
    blobs = [bytes(b) for b in _list(row.get("images"))]
    return tuple(blobs + [Path(p).read_bytes() for p in _list(row.get("image_paths"))])


class OnetowerEncoderModel(PythonModel):  # type: ignore[misc]
    """Embeds a frame of items with the registered encoder."""

    def load_context(self, context: PythonModelContext) -> None:
        self.encoder = load_encoder(Path(context.artifacts["encoder"]))

    # No type hints on predict's input: MLflow would read them as a (list-wrapped) signature.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        frame = model_input.to_pandas() if hasattr(model_input, "to_pandas") else model_input
        rows = frame.to_dict(orient="records")
        items = [Item(item_id=str(r.get("item_id", i)), title=_text(r.get("title")),
                      description=_text(r.get("description")), attributes=_attributes(r.get("attributes")),
                      images=_images(r)) for i, r in enumerate(rows)]
        return self.encoder.encode(items)


mlflow.models.set_model(OnetowerEncoderModel())
