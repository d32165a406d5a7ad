"""Render synthetic item images: a silhouette per category, a two-tone pattern, a corner badge, noise.

Deterministic given the generator; vectorised over a chunk of items (memory: one float image per item).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray
from PIL import Image

from training.data.traits import COLOUR_RGB, COLUMN, VOCAB

_CHUNK_PIXELS = 1 << 21  # pixels per render chunk bounds memory: 512 images of 64x64
_WRITERS = 4  # PNG encoding releases the GIL

_Float = NDArray[np.floating[Any]]


# Silhouettes and patterns are masks over object coordinates u, v in [-1, 1] (v points down).
def _box(u: _Float, v: _Float, u0: float, u1: float, v0: float, v1: float) -> NDArray[np.bool_]:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _oval(u: _Float, v: _Float, cu: float, cv: float, ru: float, rv: float) -> NDArray[np.bool_]:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1


def _ring(u: _Float, v: _Float, cu: float, cv: float) -> NDArray[np.bool_]:
    return _oval(u, v, cu, cv, 0.4, 0.4) & ~_oval(u, v, cu, cv, 0.24, 0.24)


_Mask = Callable[[_Float, _Float], NDArray[np.bool_]]
_SILHOUETTES: dict[str, _Mask] = {  # by category, one distinct outline each
    "bag": lambda u, v: _box(u, v, -.65, .65, -.15, .75) | (_ring(u, v, 0, -.15) & (v <= -.15)),
    "shirt": lambda u, v: (_box(u, v, -.42, .42, -.6, .8) | _box(u, v, -.88, .88, -.6, -.2))
    & ~_oval(u, v, 0, -.6, .2, .14),
    "shoe": lambda u, v: _box(u, v, -.8, .8, .25, .55) | _box(u, v, -.8, -.15, -.45, .3)
    | _oval(u, v, .35, .3, .45, .25),
    "lamp": lambda u, v: ((v >= -.8) & (v <= -.15) & (np.abs(u) <= .2 + .75 * (v + .8)))
    | _box(u, v, -.07, .07, -.15, .55) | _box(u, v, -.45, .45, .55, .72),
    "mug": lambda u, v: _box(u, v, -.6, .3, -.55, .7) | (_ring(u, v, .3, .07) & (u >= .3)),
    "hat": lambda u, v: _oval(u, v, 0, .4, .95, .18) | _box(u, v, -.45, .45, -.35, .4)
    | _oval(u, v, 0, -.35, .45, .2),
    "bottle": lambda u, v: _box(u, v, -.35, .35, -.1, .85) | _oval(u, v, 0, -.1, .35, .25)
    | _box(u, v, -.12, .12, -.8, -.1),
    "chair": lambda u, v: _box(u, v, -.55, .55, -.02, .15) | _box(u, v, -.55, -.38, -.8, 0)
    | _box(u, v, -.55, -.42, .15, .8) | _box(u, v, .42, .55, .15, .8),
    "watch": lambda u, v: _oval(u, v, 0, 0, .42, .42) | _box(u, v, -.22, .22, -.95, .95),
    "vase": lambda u, v: _oval(u, v, 0, .3, .55, .5) | _box(u, v, -.16, .16, -.75, 0)
    | _oval(u, v, 0, -.75, .3, .08),
}
_K = 3.0  # pattern frequency: a stripe is 1/3 of an object unit, about 8 px at 64 px
_PATTERNS: dict[str, _Mask] = {  # where the object shows its second tone
    "solid": lambda u, v: np.zeros(u.shape, bool),
    "stripes": lambda u, v: np.floor(u * _K) % 2 == 1,
    "dots": lambda u, v: (u * _K % 1 - .5) ** 2 + (v * _K % 1 - .5) ** 2 < .09,
    "checks": lambda u, v: (np.floor(u * _K) + np.floor(v * _K)) % 2 == 1,
    "zigzag": lambda u, v: np.floor(v * _K + np.abs(u * _K % 2 - 1)) % 2 == 1,
}
_BADGES: dict[str, _Mask] = {
    "circle": lambda u, v: u**2 + v**2 <= 1,
    "square": lambda u, v: (np.abs(u) <= .85) & (np.abs(v) <= .85),
    "triangle": lambda u, v: (v <= .8) & (v >= 2 * np.abs(u) - 1),
    "cross": lambda u, v: ((np.abs(u) <= .3) & (np.abs(v) <= 1)) | ((np.abs(v) <= .3) & (np.abs(u) <= 1)),
}
_BASE_RGB = np.asarray([COLOUR_RGB[c] for c in VOCAB["colour"]], np.float32)
# the second tone mixes the colour 40% towards black (towards white for dark colours): hue survives
_ALT_RGB = np.where(_BASE_RGB.mean(1, keepdims=True) > 80, _BASE_RGB * 0.6, 0.6 * _BASE_RGB + 102)
_BADGE_RGB = np.asarray([45, 45, 45], np.float32)


def _masks(which: NDArray[np.int64], shapes: dict[str, _Mask], u: _Float, v: _Float) -> NDArray[np.bool_]:
    u, v = np.broadcast_arrays(u, v)
    out = np.zeros(u.shape, bool)
    for k, mask in enumerate(shapes.values()):
        sel = which == k
        if sel.any():
            out[sel] = mask(u[sel], v[sel])
    return out


def render(codes: NDArray[np.int64], size: int, noise: float, rng: np.random.Generator) -> NDArray[np.uint8]:
    """Render items as (B, size, size, 3) uint8 images: background, object, corner badge."""
    b = len(codes)
    grid = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
    x, y = grid[None, None, :], grid[None, :, None]
    angle = (rng.uniform(-1, 1, b) * noise * np.pi / 5).astype(np.float32)[:, None, None]
    scale = (0.72 * (1 + rng.uniform(-1, 1, b) * noise * 0.25)).astype(np.float32)[:, None, None]
    shift = (rng.uniform(-1, 1, (b, 2, 1, 1)) * noise * 0.25).astype(np.float32)  # crops push it off-centre
    dx, dy = x - shift[:, 0], y - shift[:, 1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / scale  # (B, size, size)
    v = (np.cos(angle) * dy - np.sin(angle) * dx) / scale
    obj = _masks(codes[:, COLUMN["category"]], _SILHOUETTES, u, v)
    second = _masks(codes[:, COLUMN["pattern"]], _PATTERNS, u, v)
    colour = codes[:, COLUMN["colour"]]
    fill = np.where(second[..., None], _ALT_RGB[colour][:, None, None], _BASE_RGB[colour][:, None, None])
    img = np.where(obj[..., None], fill, _background(rng, b, x, y, noise))
    corner = rng.integers(0, 2, (b, 2, 1, 1)) * 1.48 - 0.74  # badge centre in one of the four corners
    badge = _masks(codes[:, COLUMN["shape"]], _BADGES, (x - corner[:, 0]) / 0.18, (y - corner[:, 1]) / 0.18)
    img = np.where(badge[..., None], _BADGE_RGB, img)
    if noise > 0:  # uniform pixel noise from raw bytes: far cheaper than normal draws
        grain = np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape)
        img = img + (grain.astype(np.float32) - 127.5) * (noise * 0.25)
    return np.clip(img, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, b: int, x: _Float, y: _Float, noise: float) -> _Float:
    """Grey-ish tint plus soft coloured blobs whose strength grows with noise: (B, S, S, 3)."""
    tint = rng.uniform(95, 175, (b, 1, 1, 1)) + rng.uniform(-15, 15, (b, 1, 1, 3))
    img = np.broadcast_to(tint.astype(np.float32), (b, y.shape[1], x.shape[2], 3)).copy()
    for _ in range(3):
        centre = rng.uniform(-1, 1, (b, 2, 1, 1)).astype(np.float32)
        radius = rng.uniform(0.1, 0.4, (b, 1, 1)).astype(np.float32)
        amplitude = (rng.uniform(-1, 1, (b, 1, 1, 3)) * noise * 90).astype(np.float32)
        blob = np.exp(-((x - centre[:, 0]) ** 2 + (y - centre[:, 1]) ** 2) / (2 * radius**2))
        img += blob[..., None] * amplitude
    return img


def write_images(folder: Path | None, codes: NDArray[np.int64], has_image: NDArray[np.bool_], item_ids: pl.Series,
                 size: int, noise: float, seed: int, progress: Callable[[int], None] | None) -> None:
    """Render and write `folder/<item_id>.png` for the items with an image, chunk by chunk, so memory stays
    bounded at any catalog size; `folder` None renders nothing (progress is still reported)."""
    n, chunk = len(codes), max(1, _CHUNK_PIXELS // size**2)
    if folder is not None:
        folder.mkdir(exist_ok=True)
    with ThreadPoolExecutor(max_workers=_WRITERS) as pool:
        for k, lo in enumerate(range(0, n, chunk)):
            hi = min(n, lo + chunk)
            idx = lo + np.flatnonzero(has_image[lo:hi])
            if folder is not None and idx.size:
                rng = np.random.default_rng([seed, 3, k])  # per chunk: chunks are independent
                images = render(codes[idx], size, noise, rng)
                paths = [folder / f"{item_id}.png" for item_id in item_ids.gather(idx)]
                list(pool.map(_save_png, paths, images))
            if progress is not None:
                progress(hi - lo)


def _save_png(path: Path, image: NDArray[np.uint8]) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=1)
