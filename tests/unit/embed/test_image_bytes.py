"""`strip_metadata` drops metadata and trailing bytes without changing a decoded pixel (`embed.image_bytes`)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps, ImageSequence, PngImagePlugin

from embed.errors import InvalidItemError
from embed.image_bytes import strip_metadata
from embed.images import decode_image

JUNK = 2 * 1024 * 1024  # the 15 MB, scaled down to keep the tests fast
ZEROS = b"\0" * JUNK
XMP_ROTATED = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
XMP_PLAIN = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description dc:title="a bag"/></x:xmpmeta>'


def _photo(mode: str = "RGB", size: tuple[int, int] = (40, 24), seed: int = 0) -> Image.Image:
    """Noise over gradients, so that every codec has detail to keep; alpha is a gradient too."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1)
    rgb = np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
    alpha = (xx * 255 // w).astype(np.uint8)[..., None]
    im = Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")
    if mode == "P":
        return im.convert("RGB").quantize(64)
    return im.convert(mode)


def _encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _noise(n: int) -> bytes:
    """Incompressible bytes, for metadata a writer compresses (PNG's iCCP)."""
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _png_insert(png: bytes, chunk: bytes, before: bytes = b"IDAT") -> bytes:
    i = png.index(before) - 4
    return png[:i] + chunk + png[i:]


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _jpeg_insert(jpeg: bytes, segment: bytes) -> bytes:
    return jpeg[:2] + segment + jpeg[2:]


def _webp_append(webp: bytes, fourcc: bytes, payload: bytes) -> bytes:
    body = webp[12:] + fourcc + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def _gif_insert(gif: bytes, block: bytes) -> bytes:
    """Insert an extension block just before the trailer."""
    return gif[:-1] + block + gif[-1:]


def _sub_blocks(payload: bytes) -> bytes:
    return b"".join(bytes([len(payload[i:i + 255])]) + payload[i:i + 255]
                    for i in range(0, len(payload), 255)) + b"\0"


def _full_frames(data: bytes) -> list[np.ndarray]:
    """Every frame at full resolution, EXIF-rotated, as RGBA."""
    with Image.open(io.BytesIO(data)) as im:
        first = np.asarray(ImageOps.exif_transpose(im).convert("RGBA"))
        rest = [np.asarray(frame.convert("RGBA")) for frame in ImageSequence.Iterator(im)][1:]
    return [first, *rest]


def _assert_same_pixels(original: bytes, stripped: bytes) -> None:
    assert np.array_equal(decode_image(stripped, 16), decode_image(original, 16))
    full, full_stripped = _full_frames(original), _full_frames(stripped)
    assert len(full) == len(full_stripped)
    for a, b in zip(full, full_stripped, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)


# Each case: the encoded image and the least number of bytes stripping must remove.
CASES: dict[str, Callable[[], tuple[bytes, int]]] = {
    "png_rgb": lambda: (_encode(_photo(), "PNG"), 0),
    "png_rgba_16bit_grey": lambda: (_encode(_photo("I;16"), "PNG"), 0),
    "png_palette_transparency": lambda: (_encode(_photo("P"), "PNG", transparency=3), 0),
    "png_text_junk": lambda: (_encode(_photo("RGBA"), "PNG", pnginfo=_pnginfo(("Comment", "x" * JUNK))), JUNK),
    "png_trailing_zeros": lambda: (_encode(_photo(), "PNG") + ZEROS, JUNK),
    "png_icc_gamma_ztxt_after_idat": lambda: (_png_after_idat(_encode(
        _photo("RGBA"), "PNG", icc_profile=_noise(JUNK // 4), pnginfo=_pnginfo(gama=True))), JUNK // 4),
    "png_exif_orientation": lambda: (_encode(_photo(), "PNG", exif=_exif(6),
                                             pnginfo=_pnginfo(("Software", "x" * 1000))), 1000),
    "png_xmp_orientation": lambda: (_encode(_photo(), "PNG", pnginfo=_pnginfo(xmp=XMP_ROTATED)), 0),
    "png_xmp_plain": lambda: (_encode(_photo(), "PNG", pnginfo=_pnginfo(xmp=XMP_PLAIN)), len(XMP_PLAIN)),
    "apng_text_junk": lambda: (_animated("PNG", pnginfo=_pnginfo(("Comment", "x" * JUNK))), JUNK),
    "jpeg_baseline_trailing_zeros": lambda: (_encode(_photo(), "JPEG", quality=90) + ZEROS, JUNK),
    "jpeg_progressive_grey": lambda: (_encode(_photo("L"), "JPEG", progressive=True), 0),
    "jpeg_cmyk_adobe": lambda: (_encode(_photo("CMYK"), "JPEG"), 0),
    "jpeg_exif_com_xmp_icc": lambda: (_jpeg_junk(_encode(
        _photo(), "JPEG", progressive=True, exif=_exif(6), comment=b"c" * 60000,
        xmp=XMP_PLAIN, icc_profile=bytes(JUNK))), JUNK),
    "jpeg_xmp_orientation": lambda: (_encode(_photo(), "JPEG", xmp=XMP_ROTATED, comment=b"c" * 9000), 9000),
    # Pillow reads the last XMP: a rotated one before it must not start to count once the plain one is gone.
    "jpeg_two_xmp_last_plain": lambda: (_jpeg_insert(_encode(_photo(), "JPEG", xmp=XMP_PLAIN), _jpeg_segment(
        0xE1, b"http://ns.adobe.com/xap/1.0/\0" + XMP_ROTATED)), len(XMP_PLAIN)),
    "jpeg_two_xmp_last_rotated": lambda: (_jpeg_insert(_encode(_photo(), "JPEG", xmp=XMP_ROTATED), _jpeg_segment(
        0xE1, b"http://ns.adobe.com/xap/1.0/\0" + XMP_PLAIN)), len(XMP_PLAIN)),
    # Any eXIf, even without an orientation, hides the text-chunk EXIF from Pillow.
    "png_exif_hides_raw_profile": lambda: (_encode(_photo(), "PNG", exif=_exif_make(), pnginfo=_pnginfo(
        ("Raw profile type exif", _raw_profile(_exif(6))), ("Comment", "c" * 500))), 500),
    "webp_exif_without_flag": lambda: (_clear_webp_flag(_encode(_photo(), "WEBP", exif=_exif(6)), 0x08), 20),
    "webp_lossy_icc_xmp": lambda: (_encode(_photo(), "WEBP", icc_profile=bytes(JUNK), xmp=XMP_PLAIN), JUNK),
    "webp_lossless_alpha_exif": lambda: (_webp_append(_encode(
        _photo("RGBA"), "WEBP", lossless=True, exif=_exif(6)), b"JUNK", bytes(JUNK)) + ZEROS, 2 * JUNK),
    "webp_xmp_orientation": lambda: (_encode(_photo(), "WEBP", xmp=XMP_ROTATED) + ZEROS, JUNK),
    "webp_animated_icc": lambda: (_animated("WEBP", icc_profile=bytes(JUNK)), JUNK),
    "gif_comment_trailing": lambda: (_encode(_photo("P"), "GIF", comment=b"c" * JUNK) + ZEROS, 2 * JUNK),
    "gif_animated_extensions": lambda: (_gif_junk(_animated("GIF", loop=0, transparency=0)), JUNK),
}


def _pnginfo(*texts: tuple[str, str], xmp: bytes = b"", gama: bool = False) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in texts:
        info.add_text(key, value)
    if xmp:
        info.add_itxt("XML:com.adobe.xmp", xmp.decode())
    if gama:
        info.add(b"gAMA", struct.pack(">I", 45455))
        info.add(b"sRGB", b"\0")
    return info


def _exif_make() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "acme"  # Make: an EXIF with no orientation
    return exif


def _raw_profile(exif: Image.Exif) -> str:
    """ImageMagick's text form of EXIF, which Pillow reads when a PNG has no eXIf."""
    data = exif.tobytes()
    return f"\nexif\n{len(data):8}\n{data.hex()}\n"


def _clear_webp_flag(webp: bytes, bit: int) -> bytes:
    assert webp[12:16] == b"VP8X"
    return webp[:20] + bytes([webp[20] & ~bit]) + webp[21:]


def _png_after_idat(png: bytes) -> bytes:
    """Metadata after the image data, which Pillow reads when it loads the pixels."""
    return _png_insert(png, _png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"x" * 5000)), before=b"IEND")


def _animated(fmt: str, **params: object) -> bytes:
    frames = [_photo("P" if fmt == "GIF" else "RGBA", seed=s) for s in range(3)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, **params)


def _jpeg_junk(jpeg: bytes) -> bytes:
    """A second (plain) XMP, an unknown APP5, and a COM between the scans of a progressive JPEG."""
    jpeg = _jpeg_insert(jpeg, _jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0" + XMP_PLAIN))
    jpeg = _jpeg_insert(jpeg, _jpeg_segment(0xE5, bytes(60000)))
    second_scan = jpeg.index(b"\xff\xda", jpeg.index(b"\xff\xda") + 2)
    return jpeg[:second_scan] + _jpeg_segment(0xFE, b"between scans") + jpeg[second_scan:]


def _gif_junk(gif: bytes) -> bytes:
    """Plain text, an unknown application extension and a comment, then junk after the trailer."""
    plain_text = b"\x21\x01\x0c" + bytes(12) + _sub_blocks(b"hello")
    app = b"\x21\xff\x0bXMP DataXMP" + _sub_blocks(bytes(JUNK // 2))
    comment = b"\x21\xfe" + _sub_blocks(b"c" * 3000)
    return _gif_insert(gif, plain_text + app + comment) + bytes(JUNK // 2)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, bytes, int]:
    data, junk = CASES[request.param]()
    return request.param, data, junk


def test_pixels_unchanged_and_junk_dropped(case: tuple[str, bytes, int]) -> None:
    name, data, junk = case
    stripped = strip_metadata(data)
    _assert_same_pixels(data, stripped)
    assert len(data) - len(stripped) >= junk, name
    assert strip_metadata(stripped) == stripped  # idempotent


def test_orientation_survives() -> None:
    for fmt in ("JPEG", "PNG", "WEBP"):
        xmp = {"pnginfo": _pnginfo(xmp=XMP_ROTATED)} if fmt == "PNG" else {"xmp": XMP_ROTATED}
        for params in ({"exif": _exif(6)}, xmp):
            data = _encode(_photo(), fmt, **params) + ZEROS[:1000]
            stripped = strip_metadata(data)
            assert len(stripped) < len(data)
            assert _full_frames(stripped)[0].shape[:2] == (40, 24), (fmt, params)  # rotated from 40 wide


def test_metadata_dropped() -> None:
    stripped = strip_metadata(CASES["jpeg_exif_com_xmp_icc"]()[0])
    with Image.open(io.BytesIO(stripped)) as im:
        assert "icc_profile" not in im.info and "comment" not in im.info and "xmp" not in im.info
        assert im.getexif()[0x0112] == 6
    with Image.open(io.BytesIO(strip_metadata(CASES["webp_lossy_icc_xmp"]()[0]))) as im:
        assert "icc_profile" not in im.info and "xmp" not in im.info


def test_png_chunk_splitting_the_image_data_is_left_alone() -> None:
    png = _encode(_photo(), "PNG")
    idat = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[idat:idat + 4])[0]
    data = png[idat + 8:idat + 8 + length]
    split = (png[:idat] + _png_chunk(b"IDAT", data[:10]) + _png_chunk(b"tEXt", b"a\0b")
             + _png_chunk(b"IDAT", data[10:]) + png[idat + 12 + length:])
    assert strip_metadata(split) == split


@pytest.mark.parametrize("data", [
    b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd8\xff", b"RIFF\xff\xff\xff\xffWEBPVP8X", b"GIF89a",
    b"GIF89a" + bytes(7) + b"\x21\xfe\x05ab", b"RIFF\x04\x00\x00\x00WEBP", b"\xff\xd8\xff\xe0\x00\x00",
    b"not an image at all",
])
def test_garbage_is_returned_unchanged(data: bytes) -> None:
    assert strip_metadata(data) is data


def _outcome(data: bytes) -> np.ndarray | str:
    try:
        return decode_image(data, 8)
    except InvalidItemError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - a damaged file may trip Pillow in other ways; compare those too
        return type(e).__name__


def _small_samples() -> list[bytes]:
    photo = _photo(size=(12, 8))
    return [
        _encode(photo, "PNG", pnginfo=_pnginfo(("Comment", "hello"))) + b"\0" * 8,
        _encode(photo, "JPEG", progressive=True, comment=b"hello", exif=_exif(3)) + b"\0" * 8,
        _encode(photo, "WEBP", lossless=True, icc_profile=b"icc" * 9) + b"\0" * 8,
        _encode(photo.quantize(16), "GIF", comment=b"hello") + b"\0" * 8,
    ]


SAMPLES = _small_samples()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_random_bytes_never_raise(data: bytes) -> None:
    for prefix in (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"RIFF", b"GIF89a"):
        strip_metadata(prefix + data)


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(SAMPLES), st.integers(0, 10_000), st.integers(0, 255), st.booleans())
def test_damaged_files_decode_as_before(sample: bytes, where: int, value: int, truncate: bool) -> None:
    """Truncated or byte-flipped files: stripping never turns a decodable image into another one."""
    i = where % len(sample)
    damaged = sample[:i] if truncate else sample[:i] + bytes([value]) + sample[i + 1:]
    stripped = strip_metadata(damaged)
    before = _outcome(damaged)
    if isinstance(before, np.ndarray):
        after = _outcome(stripped)
        assert isinstance(after, np.ndarray) and np.array_equal(before, after)
    assert strip_metadata(stripped) == stripped
