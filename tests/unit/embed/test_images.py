"""Image decoding guards and preprocessing (`embed.images`) on real encoded files."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from embed.errors import InvalidItemError
from embed.images import decode_image, patchify, to_tensor

SIZE = 16
ORANGE = (230, 120, 30)

Encode = Callable[..., bytes]


def _solid(color: tuple[int, ...], mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new(mode, size, color)


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims `width` x `height` (a decompression bomb that costs nothing to make)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _expect(reason: str, data: bytes, field: str = "images[2]", **kwargs: int) -> InvalidItemError:
    with pytest.raises(InvalidItemError) as info:
        decode_image(data, SIZE, field, **kwargs)
    err = info.value
    assert err.reason == reason
    assert err.field == field
    assert str(err).startswith(f"{reason}: items.{field} ")
    return err


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_allowed_formats_decode_to_square_rgb_uint8(encode_image: Encode, fmt: str) -> None:
    out = decode_image(encode_image(_solid(ORANGE), fmt), SIZE)
    assert out.shape == (SIZE, SIZE, 3)
    assert out.dtype == np.uint8
    assert out.flags.writeable
    # lossy formats and the GIF palette move colours a little, never far
    assert np.abs(out.astype(int) - np.array(ORANGE)).max() <= 12


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_greyscale_and_palette_sources_become_rgb(encode_image: Encode, fmt: str) -> None:
    grey = decode_image(encode_image(_solid(90, "L"), fmt), SIZE)
    assert grey.shape == (SIZE, SIZE, 3)
    assert np.abs(grey.astype(int) - 90).max() <= 3


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(encode_image: Encode) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = decode_image(encode_image(ramp), 64)
    expected = (ramp >> 8).astype(int)
    assert np.abs(out[:, :, 0].astype(int) - expected).max() <= 1
    assert (out == 255).mean() < 0.05  # clipping would make ~98% of it white


def test_gif_gives_its_first_frame(encode_image: Encode) -> None:
    frames = [_solid((255, 0, 0)), _solid((0, 0, 255)), _solid((0, 255, 0))]
    data = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, SIZE)
    assert (out[:, :, 0] > 240).all() and (out[:, :, 1:] < 15).all()


def test_exif_orientation_is_applied(encode_image: Encode) -> None:
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 means "rotate 90 degrees
    # clockwise to display", so the displayed picture is 20 x 40 with red on top and blue below.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode_image(stored, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, SIZE).astype(int)
    top, bottom = out[2, SIZE // 2], out[-3, SIZE // 2]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # without the rotation, the centre crop would be red on the left and blue on the right
    assert np.abs(out[SIZE // 2, 2] - out[SIZE // 2, -3]).max() < 30


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_alpha_is_composited_on_white(encode_image: Encode, fmt: str) -> None:
    rgba = np.zeros((30, 30, 4), np.uint8)  # black, fully transparent ...
    rgba[:, 15:, 3] = 128  # ... except the right half, half-opaque black
    out = decode_image(encode_image(Image.fromarray(rgba, "RGBA"), fmt, lossless=True), 30).astype(int)
    assert (out[:, :13] == 255).all()
    assert np.abs(out[:, 17:] - 127).max() <= 2


def test_palette_transparency_is_composited_on_white(encode_image: Encode) -> None:
    img = Image.new("P", (20, 20), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    img.paste(0, (0, 0, 10, 20))  # left half uses index 0, declared transparent below
    out = decode_image(encode_image(img, "GIF", transparency=0), 20).astype(int)
    assert (out[:, :8] == 255).all()
    assert (out[:, 12:, 0] == 255).all() and (out[:, 12:, 1:] == 0).all()


def test_resize_keeps_aspect_and_centre_crops(encode_image: Encode) -> None:
    # 60 wide x 20 high: thirds red | green | blue; the square centre crop is all green
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20], wide[:, 20:40], wide[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = decode_image(encode_image(wide), 10).astype(int)
    assert (out[:, 2:8, 1] > 200).all() and (out[:, 2:8, 0] < 40).all() and (out[:, 2:8, 2] < 40).all()


def test_empty_bytes_are_refused() -> None:
    err = _expect("image_empty", b"")
    assert err.path() == "items.images[2]"
    assert err.at(3).path() == "items[3].images[2]"


def test_random_bytes_are_undecodable() -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _expect("image_undecodable", data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_files_are_undecodable(encode_image: Encode, fmt: str, keep: float) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode_image(pixels, fmt)
    _expect("image_undecodable", data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PPM"])
def test_formats_outside_the_allowlist_are_refused(encode_image: Encode, fmt: str) -> None:
    data = encode_image(_solid(ORANGE), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself reads it
    err = _expect("image_undecodable", data)
    assert "JPEG" in err.detail and "PNG" in err.detail


def test_decompression_bomb_is_refused_before_decoding() -> None:
    data = _png_with_size(20000, 20000)
    assert len(data) < 100
    err = _expect("image_too_large", data)
    assert "pixel" in err.detail


def test_pixel_ceiling_is_checked_from_the_header() -> None:
    data = _png_with_size(8000, 6000)  # 48M pixels: over the default ceiling, under Pillow's own
    _expect("image_too_large", data)
    _expect("image_too_large", _png_with_size(101, 100), max_pixels=10_000)


def test_byte_ceiling(encode_image: Encode) -> None:
    data = encode_image(_solid(ORANGE))
    _expect("image_too_large", data, max_bytes=len(data) - 1)
    assert decode_image(data, SIZE, max_bytes=len(data)).shape == (SIZE, SIZE, 3)


def test_to_tensor_scales_to_minus_one_one() -> None:
    pixels = np.array([[[0, 255, 127]]], np.uint8)  # (1, 1, 3)
    t = to_tensor(pixels[None])
    assert t.shape == (1, 3, 1, 1) and t.dtype == torch.float32
    assert torch.allclose(t.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


def test_patchify_shape_and_row_major_order() -> None:
    b, h, w, p = 2, 8, 12, 4
    images = torch.arange(b * 3 * h * w, dtype=torch.float32).reshape(b, 3, h, w)
    tiles = patchify(images, p)
    gh, gw = h // p, w // p
    assert tiles.shape == (b, gh * gw, 3 * p * p)
    for r in range(gh):
        for c in range(gw):
            expected = images[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(b, -1)
            assert torch.equal(tiles[:, r * gw + c], expected)
    # the inverse permutation restores the images exactly
    restored = tiles.reshape(b, gh, gw, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h, w)
    assert torch.equal(restored, images)
