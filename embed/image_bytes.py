"""Lossless removal of metadata and trailing bytes from encoded images, before they are stored (issue #20).

`strip_metadata` parses the container (PNG, JPEG, WebP, GIF) and copies the structures that
`embed.images.decode_image` depends on, byte for byte; it never re-encodes. Which structures are
kept follows what Pillow reads when it opens and decodes a file (checked against Pillow 13):

- Pixels: image data, palettes, transparency, colour transform markers, animation control.
- Orientation: `ImageOps.exif_transpose` reads EXIF, and, when EXIF has no orientation, an XMP
  `tiff:Orientation`. Every EXIF source Pillow reads is kept whole (Pillow concatenates JPEG Exif
  segments, and any EXIF, even one without an orientation, stops PNG's fallback sources from being
  read). An XMP packet is kept only where it may carry `tiff:Orientation`.

Everything else (comments, ICC profiles, other XMP, thumbnails, unknown chunks, bytes past the end
of the image) is dropped. Input that is not one of the four formats, or whose structure is
truncated, inconsistent or unusual in a way that could make dropping change what Pillow decodes,
is returned unchanged: the decoder refuses bad images with its own reasons.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XMP_ORIENTATION = b"tiff:Orientation"  # Image.getexif's XMP fallback matches this followed by =" or >

_PNG_KEPT = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"acTL", b"fcTL", b"fdAT", b"eXIf"}
_PNG_DATA = {b"IDAT", b"fdAT"}
_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt"}
# Pillow stores a text chunk under its keyword in `img.info`; these keywords are info keys its
# decoding, conversion or EXIF code reads, so a text chunk that uses one can change the pixels.
_PNG_TEXT_READ = {b"exif", b"Raw profile type exif", b"transparency", b"interlace", b"default_image",
                  b"disposal", b"blend", b"bbox", b"duration", b"loop"}
_PNG_TEXT_XMP = {b"XML:com.adobe.xmp", b"xmp"}

_WEBP_KEPT = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF"}
_WEBP_DATA = {b"VP8 ", b"VP8L", b"ALPH"}
_WEBP_ICC, _WEBP_EXIF, _WEBP_XMP = 0x20, 0x08, 0x04  # VP8X flag bits

_JPEG_FILL = re.compile(rb"\xff+")
# A marker after entropy-coded data: 0xFF then neither a stuffed 0x00, a restart marker nor more fill.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_EXIF = b"Exif\0\0"
_JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\0"


class _Unparsable(Exception):
    """The structure is not one this module can strip safely; the input is returned unchanged."""


def strip_metadata(data: bytes) -> bytes:
    """Drop the metadata and trailing bytes of an encoded image without changing a decoded pixel.

    Args:
        data: encoded image bytes, possibly hostile.

    Returns:
        The image with only the structures decoding depends on, or `data` itself when it is not a
        PNG, JPEG, WebP or GIF this module can parse, or when nothing was dropped. Never raises on
        malformed input; runs in time linear in `len(data)`. Stripping twice gives the same bytes.
    """
    try:
        if data.startswith(PNG_SIGNATURE):
            out = _strip_png(data)
        elif data.startswith(b"\xff\xd8"):
            out = _strip_jpeg(data)
        elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            out = _strip_webp(data)
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            out = _strip_gif(data)
        else:
            return data
    except (_Unparsable, IndexError, ValueError):
        return data
    return out if len(out) < len(data) else data


# PNG ----------------------------------------------------------------------------------------------

def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """Yield (type, start, end) of each chunk up to IEND; `data[start:end]` is the whole chunk."""
    pos, n, view = len(PNG_SIGNATURE), len(data), memoryview(data)
    while True:
        if pos + 12 > n:
            raise _Unparsable("no IEND")
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if length > 0x7FFFFFFF or not ctype.isalpha() or end > n:
            raise _Unparsable("bad chunk")
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise _Unparsable("bad CRC")  # Pillow refuses it; keep its refusal
        yield ctype, pos, end
        if ctype == b"IEND":
            return
        pos = end


def _png_text_key(data: bytes, start: int, end: int) -> bytes | None:
    """The keyword of a text chunk as Pillow reads it (everything when there is no NUL)."""
    nul = data.find(b"\0", start + 8, end - 4)
    key_end = end - 4 if nul < 0 else nul
    return data[start + 8:key_end] if key_end - start - 8 <= 80 else None


def _png_xmp_may_orient(data: bytes, ctype: bytes, start: int, end: int) -> bool:
    """Whether an XMP text chunk may hold an orientation (compressed ones are not inflated)."""
    if ctype == b"zTXt":
        return True
    if ctype == b"iTXt":
        nul = data.find(b"\0", start + 8, end - 4)
        if nul < 0 or nul + 1 >= end - 4 or data[nul + 1] != 0:
            return True  # compressed, or malformed: keep
    return data.find(XMP_ORIENTATION, start + 8, end - 4) >= 0


def _strip_png(data: bytes) -> bytes:
    chunks = list(_png_chunks(data))
    keys = {i: _png_text_key(data, s, e) for i, (t, s, e) in enumerate(chunks) if t in _PNG_TEXT}
    xmp = [i for i, k in keys.items() if k in _PNG_TEXT_XMP]
    # Pillow reads the last XMP under two keys; keeping all or none of them keeps its choice.
    keep_xmp = any(_png_xmp_may_orient(data, *chunks[i]) for i in xmp)
    out = [PNG_SIGNATURE]
    last_kept_is_data = dropped_since = False
    for i, (ctype, start, end) in enumerate(chunks):
        key = keys.get(i)
        keep = ctype in _PNG_KEPT or key in _PNG_TEXT_READ or (keep_xmp and key in _PNG_TEXT_XMP)
        if not keep:
            dropped_since = True
            continue
        is_data = ctype in _PNG_DATA
        if is_data and last_kept_is_data and dropped_since:
            raise _Unparsable("a chunk splits the image data")  # Pillow stops reading there
        out.append(data[start:end])
        last_kept_is_data, dropped_since = is_data, False
    return b"".join(out)


# JPEG ---------------------------------------------------------------------------------------------

def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Yield (marker, start, end) after SOI up to EOI; an SOS segment includes its entropy-coded data."""
    pos, n = 2, len(data)
    while True:
        fill = _JPEG_FILL.match(data, pos)
        if fill is None or fill.end() >= n:
            raise _Unparsable("no marker")
        pos = fill.end() - 1  # fill bytes before a marker are dropped
        marker = data[pos + 1]
        if marker == 0xD9:
            yield marker, pos, pos + 2
            return
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8 or pos + 4 > n:
            raise _Unparsable("unexpected marker")
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end < pos + 4 or end > n:
            raise _Unparsable("bad segment length")
        if marker == 0xDA:
            scan_end = _JPEG_MARKER.search(data, end)
            if scan_end is None:
                raise _Unparsable("no end of scan")
            end = scan_end.start()
        yield marker, pos, end
        pos = end


def _jpeg_keeps(data: bytes, marker: int, start: int, end: int, before_sos: bool) -> bool:
    """Whether to keep a segment (the last XMP is decided by the caller)."""
    if marker == 0xFE or 0xE0 <= marker <= 0xEF:
        if not before_sos:
            return False  # Pillow reads markers up to the first SOS; libjpeg's colour setup is done
        payload = data[start + 4:min(end, start + 4 + len(_JPEG_XMP))]
        if marker == 0xE2 and payload.startswith(b"MPF\0"):
            raise _Unparsable("MPO: its frames are addressed by offsets")
        return ((marker == 0xE0 and payload.startswith(b"JFIF"))  # libjpeg: YCbCr colour space
                or (marker == 0xE1 and payload.startswith(_JPEG_EXIF))  # Pillow concatenates them all
                or (marker == 0xEE and payload.startswith(b"Adobe")))  # libjpeg: colour transform
    return True


def _strip_jpeg(data: bytes) -> bytes:
    segments = list(_jpeg_segments(data))
    first_sos = next(i for i, (m, _, _) in enumerate(segments) if m in (0xDA, 0xD9))
    xmp = [i for i, (m, s, e) in enumerate(segments[:first_sos])
           if m == 0xE1 and data.startswith(_JPEG_XMP, s + 4, e)]
    # Pillow keeps the last XMP packet; it matters only when it may hold an orientation.
    kept_xmp = xmp[-1] if xmp and data.find(XMP_ORIENTATION, *segments[xmp[-1]][1:]) >= 0 else -1
    out = [b"\xff\xd8"]
    for i, (marker, start, end) in enumerate(segments):
        if i == kept_xmp or _jpeg_keeps(data, marker, start, end, i < first_sos):
            out.append(data[start:end])
    return b"".join(out)


# WebP ---------------------------------------------------------------------------------------------

def _webp_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(fourcc, start, end) of each chunk inside the RIFF size, padding included."""
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    if riff_end > len(data) or riff_end < 20:
        raise _Unparsable("bad RIFF size")
    chunks: list[tuple[bytes, int, int]] = []
    pos = 12
    while pos < riff_end:
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        end = pos + 8 + size + (size & 1)
        if pos + 8 > riff_end or end > riff_end:
            raise _Unparsable("chunk past the RIFF end")
        chunks.append((data[pos:pos + 4], pos, end))
        pos = end
    if chunks[0][0] not in (b"VP8 ", b"VP8L", b"VP8X") or (chunks[0][0] == b"VP8X" and chunks[0][2] < 30):
        raise _Unparsable("no image header chunk")
    return chunks


def _strip_webp(data: bytes) -> bytes:
    chunks = _webp_chunks(data)
    flags = data[20] if chunks[0][0] == b"VP8X" else 0
    # libwebp's demuxer, which Pillow uses, exposes the first EXIF / XMP only when its flag is set.
    exif = next((i for i, (t, _, _) in enumerate(chunks) if t == b"EXIF"), -1) if flags & _WEBP_EXIF else -1
    xmp = next((i for i, (t, _, _) in enumerate(chunks) if t == b"XMP "), -1) if flags & _WEBP_XMP else -1
    if xmp >= 0 and data.find(XMP_ORIENTATION, chunks[xmp][1], chunks[xmp][2]) < 0:
        xmp = -1
    body = []
    last_kept_is_data = dropped_since = False
    for i, (fourcc, start, end) in enumerate(chunks):
        if fourcc not in _WEBP_KEPT and i not in (exif, xmp):
            dropped_since = True
            continue
        is_data = fourcc in _WEBP_DATA
        if is_data and last_kept_is_data and dropped_since:
            raise _Unparsable("a chunk splits a frame")  # the demuxer would refuse the original
        body.append(data[start:end])
        last_kept_is_data, dropped_since = is_data, False
    if flags:
        flags &= ~_WEBP_ICC & ~(0 if exif >= 0 else _WEBP_EXIF) & ~(0 if xmp >= 0 else _WEBP_XMP)
        body[0] = body[0][:8] + bytes([flags]) + body[0][9:]
    size = 4 + sum(len(b) for b in body)
    return b"RIFF" + size.to_bytes(4, "little") + b"WEBP" + b"".join(body)


# GIF ----------------------------------------------------------------------------------------------

def _gif_sub_blocks_end(data: bytes, pos: int) -> int:
    """Index just past a chain of data sub-blocks and its zero-length terminator."""
    while True:
        size = data[pos]  # IndexError when truncated
        pos += 1 + size
        if size == 0:
            return pos


def _strip_gif(data: bytes) -> bytes:
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen, global colour table
    out = [data[:pos]]
    while True:
        introducer = data[pos]
        if introducer == 0x3B:  # trailer
            out.append(b";")
            return b"".join(out)
        if introducer == 0x21:  # extension: label, then sub-blocks
            label = data[pos + 1]
            end = _gif_sub_blocks_end(data, pos + 2)
            # Graphic control: delay, disposal, transparency. NETSCAPE2.0: the loop count.
            if label == 0xF9 or (label == 0xFF and data.startswith(b"NETSCAPE2.0", pos + 3)):
                out.append(data[pos:end])
        elif introducer == 0x2C:  # image: descriptor, local colour table, LZW code size, data
            desc = data[pos + 9]
            start = pos + 10 + (3 << ((desc & 7) + 1) if desc & 0x80 else 0)
            end = _gif_sub_blocks_end(data, start + 1)
            out.append(data[pos:end])
        else:
            raise _Unparsable("unknown GIF block")
        if end > len(data):
            raise _Unparsable("truncated")
        pos = end
