"""Image decoding with guards (format allowlist, pixel ceiling, no truncated files) and preprocessing."""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from embed.errors import InvalidItemError

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7700 x 5200 photo; larger is refused, not resized
DEFAULT_MAX_BYTES = 20 * 1024 * 1024


def decode_image(data: bytes, size: int, field: str = "images[0]", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode one encoded image into an RGB uint8 array of shape (size, size, 3).

    The image is EXIF-rotated, composited on white if it has alpha, resized on its short side
    and centre-cropped. GIFs give their first frame.

    Raises:
        InvalidItemError: empty, too large, not an allowed format, truncated or undecodable.
    """
    if not data:
        raise InvalidItemError("image_empty", field, "is empty")
    if len(data) > max_bytes:
        raise InvalidItemError("image_too_large", field, f"has {len(data)} bytes, limit {max_bytes}")
    try:
        # Image.open reads only the header, so the pixel ceiling is checked before any decoding.
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        w, h = img.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            raise InvalidItemError("image_too_large", field, f"is {w}x{h} pixels, limit {max_pixels} pixels")
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the photo is large
        img.seek(0)  # GIF and animated WebP/PNG: the first frame
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    except InvalidItemError:
        raise
    except UnidentifiedImageError:
        raise InvalidItemError("image_undecodable", field,
                               f"is not {', '.join(ALLOWED_FORMATS)} (or is damaged)") from None
    except Image.DecompressionBombError as e:
        raise InvalidItemError("image_too_large", field, f"exceeds the pixel limit ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or malformed data
        raise InvalidItemError("image_undecodable", field, f"could not be decoded: {e}") from None
    fitted = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BICUBIC)
    return np.array(fitted, dtype=np.uint8)  # a writable copy


def image_pixels(data: bytes) -> int:
    """Width x height from the header alone (nothing is decoded); 0 when the header cannot be read
    (`decode_image` then refuses the image with its reason)."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            w, h = img.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return 0
    return max(w, 0) * max(h, 0)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale PNG: convert() would clip every value above 255 to white, so scale to 8 bits.
        grey = np.clip(np.asarray(img, dtype=np.int64) >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) scaled to [-1, 1]."""
    t = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).movedim(-1, -3).float()
    return t.div_(127.5).sub_(1.0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3*P*P) patches in row-major grid order."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
