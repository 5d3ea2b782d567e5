"""Image sizes read from headers: the PNG and JPEG fast paths agree with PIL, others go to PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kdcache.shards.reading import _jpeg_size, _png_size, check_pixels, read_image_size


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _pil_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width


def _samples() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored size is still the frame's
    return [
        ("png rgb", _encode(rgb, "PNG")),
        ("png grey", _encode(grey, "PNG")),
        ("png palette", _encode(rgb.convert("P"), "PNG")),
        ("png 16-bit", _encode(Image.fromarray(np.full((9, 11), 40000, np.uint16)), "PNG")),
        ("jpeg baseline", _encode(rgb, "JPEG", quality=90)),
        ("jpeg grey", _encode(grey, "JPEG")),
        ("jpeg progressive", _encode(rgb, "JPEG", progressive=True, optimize=True)),
        ("jpeg exif", _encode(rgb, "JPEG", exif=exif.tobytes())),
        ("jpeg restart", _encode(rgb, "JPEG", restart_marker_rows=1)),
    ]


@pytest.mark.parametrize("name, data", _samples())
def test_fast_paths_agree_with_pil(name: str, data: bytes) -> None:
    fast = _png_size(data) if name.startswith("png") else _jpeg_size(data)
    assert fast is not None, name
    assert fast == _pil_size(data) == read_image_size(data)


def test_other_formats_go_to_pil() -> None:
    rgb = Image.fromarray(np.zeros((21, 34, 3), np.uint8))
    for fmt in ("BMP", "WEBP", "TIFF"):
        data = _encode(rgb, fmt)
        assert _png_size(data) is None and _jpeg_size(data) is None
        assert read_image_size(data) == (21, 34)


def test_truncated_headers_are_not_guessed() -> None:
    png = _encode(Image.new("L", (5, 6)), "PNG")
    jpeg = _encode(Image.new("L", (5, 6)), "JPEG")
    assert _png_size(png[:20]) is None
    assert _jpeg_size(jpeg[:40]) is None  # ends before the frame header
    assert _jpeg_size(b"\xff\xd8\x00\x00garbage") is None


def test_a_header_claiming_too_many_pixels_is_refused_before_decoding() -> None:
    png = bytearray(_encode(Image.new("L", (4, 4)), "PNG"))
    png[16:24] = (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big")  # a forged IHDR
    with pytest.raises(ValueError, match=r"30000 x 30000 = 900000000 pixels.*data.max_pixels"):
        check_pixels(bytes(png), max_pixels=10_000_000)
    check_pixels(bytes(png), max_pixels=10**9)  # within the limit: left to the decoder
