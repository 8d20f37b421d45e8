"""#21: PNG rows decoded by Pillow (restoreflow/io/pngfast.py) give the values pypng's ``asDirect`` gave, for every
bit depth and colour type, interlaced or not, every row filter, with tRNS/sBIT/palette; malformed files are
refused or read exactly as pypng alone does."""

import struct
import zlib

import numpy as np
import pytest

import restoreflow.io.codecs as codecs
from restoreflow.io import pngfast


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _filter_row(ftype: int, row: bytes, prior: bytes, bpp: int) -> bytes:
    """The PNG specification's forward filters (section 9.2), written out byte by byte."""
    out = bytearray()
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prior[i]
        c = prior[i - bpp] if i >= bpp else 0
        pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[ftype]
        out.append((x - pred) % 256)
    return bytes([ftype]) + bytes(out)


def _pack(samples: np.ndarray, depth: int) -> bytes:
    """One row of samples (already flattened over the channels) as PNG packs it, big-endian, MSB first."""
    if depth == 16:
        return samples.astype(">u2").tobytes()
    if depth == 8:
        return samples.astype(np.uint8).tobytes()
    per = 8 // depth
    padded = np.concatenate([samples, np.zeros((-len(samples)) % per, samples.dtype)]).reshape(-1, per)
    shifts = np.arange(per - 1, -1, -1) * depth
    return (padded.astype(np.uint16) << shifts).sum(1).astype(np.uint8).tobytes()


def _encode(img: np.ndarray, depth: int, ctype: int, *, interlace: bool, rng, extra=(), idat_parts=1,
            mangle=None) -> bytes:
    """A PNG of ``img`` (H x W x samples) with a random filter type on every row (and pass)."""
    h, w, n = img.shape
    bpp = max(1, depth * n // 8)
    passes = pngfast._ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        sub = img[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        prior = None
        for r in sub:
            row = _pack(r.reshape(-1), depth)
            prior = bytes(len(row)) if prior is None else prior
            raw += _filter_row(int(rng.integers(0, 5)), row, prior, bpp)
            prior = row
    if mangle:
        raw = mangle(raw)
    z = zlib.compress(bytes(raw), 6)
    cuts = np.linspace(0, len(z), idat_parts + 1).astype(int)
    idats = [_chunk(b"IDAT", z[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    head = _chunk(b"IHDR", struct.pack("!IIBBBBB", w, h, depth, ctype, 0, 0, int(interlace)))
    return b"\x89PNG\r\n\x1a\n" + head + b"".join(_chunk(k, d) for k, d in extra) + b"".join(idats) + _chunk(b"IEND", b"")


def _pypng(path):
    """The decoder as it was: pypng's rows alone."""
    orig = codecs.direct_pixels
    codecs.direct_pixels = lambda *a: None
    try:
        return codecs._read_png(path)
    finally:
        codecs.direct_pixels = orig


def _outcome(f, path):
    try:
        return f(path)
    except Exception as e:  # noqa: BLE001 - the outcome compared is the exception itself
        return (type(e).__name__, str(e))


def _same(a, b):
    if isinstance(a, tuple) or isinstance(b, tuple):
        return isinstance(a, tuple) and isinstance(b, tuple) and a == b
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


CASES = [(d, c) for c, depths in ((0, (1, 2, 4, 8, 16)), (2, (8, 16)), (3, (1, 2, 4, 8)), (4, (8, 16)), (6, (8, 16)))
         for d in depths]


@pytest.mark.parametrize("depth,ctype", CASES)
@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("chunk", ["none", "tRNS", "sBIT"])
def test_fast_equals_pypng(tmp_path, depth, ctype, interlace, chunk):
    rng = np.random.default_rng(depth * 100 + ctype * 10 + interlace)
    n = pngfast._CHANNELS[ctype]
    h, w = 11, 13
    top = (2**depth - 1) if ctype != 3 else min(2**depth, 40) - 1
    img = rng.integers(0, top + 1, size=(h, w, n), dtype=np.int64)
    extra = []
    if ctype == 3:
        extra.append((b"PLTE", rng.integers(0, 256, size=3 * (top + 1), dtype=np.uint8).tobytes()))
    if chunk == "tRNS":
        if ctype == 3:
            extra.append((b"tRNS", rng.integers(0, 256, size=top // 2 + 1, dtype=np.uint8).tobytes()))
        elif ctype in (0, 2):
            key = img[3, 4]
            img[5:8, 2:9] = key  # some pixels match the colour key
            extra.append((b"tRNS", struct.pack(f"!{n}H", *key.tolist())))
        else:  # invalid with an alpha channel: refused in the header, by both paths alike
            extra.append((b"tRNS", struct.pack("!H", 7)))
            p = tmp_path / "a.png"
            p.write_bytes(_encode(img, depth, ctype, interlace=interlace, rng=rng, extra=extra))
            new, old = _outcome(codecs._read_png, p), _outcome(_pypng, p)
            assert isinstance(new, tuple) and new == old
            return
    if chunk == "sBIT":
        k = 3 if ctype == 3 else n
        bits = rng.integers(1, (8 if ctype == 3 else depth) + 1, size=k)
        bits[0] = max(1, (8 if ctype == 3 else depth) - 3)
        extra.append((b"sBIT", bytes(bits.astype(np.uint8).tolist())))
    p = tmp_path / "a.png"
    p.write_bytes(_encode(img, depth, ctype, interlace=interlace, rng=rng, extra=extra, idat_parts=3))
    import png

    reader = png.Reader(filename=str(p))
    reader.preamble()
    assert pngfast.direct_pixels(p, reader, codecs._pil_open) is not None  # the fast path, not the fallback
    new, old = codecs._read_png(p), _pypng(p)
    assert new.dtype == old.dtype and new.shape == old.shape
    assert np.array_equal(new, old)


def test_photo_and_odd_sizes(tmp_path):
    """Pillow-written (adaptive filters) and restoreflow-written files, sizes 1 x 1 up to 257 x 3."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for h, w in ((1, 1), (2, 9), (257, 3), (64, 65)):
        for mode, shape in (("L", (h, w)), ("RGB", (h, w, 3)), ("RGBA", (h, w, 4)), ("LA", (h, w, 2))):
            a = rng.integers(0, 256, size=shape, dtype=np.uint8)
            a[: h // 2] = a[: h // 2].cumsum(axis=1) % 256 if w > 1 else a[: h // 2]  # smooth parts
            p = tmp_path / f"{mode}{h}x{w}.png"
            Image.fromarray(a, mode=mode).save(p, optimize=bool(h % 2))
            assert np.array_equal(codecs._read_png(p), _pypng(p))
        a16 = rng.integers(0, 65536, size=(h, w, 3), dtype=np.uint16)
        p = tmp_path / "c16.png"
        codecs._write_png(p, a16)
        assert np.array_equal(codecs._read_png(p), a16)


def _malformed(rng):
    img = rng.integers(0, 256, size=(9, 10, 3), dtype=np.int64)
    good = _encode(img, 8, 2, interlace=False, rng=rng)
    iend = good.rindex(b"IEND") - 4
    idat = good.index(b"IDAT") - 4

    def flip(b, i):
        return b[:i] + bytes([b[i] ^ 0x40]) + b[i + 1 :]

    return {
        "idat_crc": flip(good, iend - 1),
        "idat_data": flip(good, idat + 12),
        "no_iend": good[:iend],
        "cut_in_idat": good[: idat + 20],
        "trailing_junk": good + b"junk after IEND",
        "short_stream": _encode(img, 8, 2, interlace=False, rng=rng, mangle=lambda r: r[:-7]),
        "long_stream": _encode(img, 8, 2, interlace=False, rng=rng, mangle=lambda r: r + bytes(31)),
        "bad_filter": _encode(img, 8, 2, interlace=False, rng=rng, mangle=lambda r: bytes([7]) + r[1:]),
        "bad_filter_interlaced": _encode(img, 8, 2, interlace=True, rng=rng, mangle=lambda r: bytes([9]) + r[1:]),
        "palette_past_end": _encode(np.full((4, 5, 1), 9), 8, 3, interlace=False, rng=rng,
                                    extra=[(b"PLTE", bytes(range(12)))]),
        "sbit_too_deep": _encode(img, 8, 2, interlace=False, rng=rng, extra=[(b"sBIT", bytes([9, 9, 9]))]),
    }


def test_malformed_files_behave_as_before(tmp_path):
    rng = np.random.default_rng(7)
    cases = _malformed(rng)
    img = rng.integers(0, 256, size=(9, 10, 3), dtype=np.int64)
    two = _encode(img, 8, 2, interlace=False, rng=rng, idat_parts=2)
    first = two.index(b"IDAT") - 4
    second = two.index(b"IDAT", first + 8) - 4
    cases["split_idat"] = two[:second] + _chunk(b"tEXt", b"k\x00v") + two[second:]  # pypng joins them anyway
    refused = 0
    for name, data in cases.items():
        p = tmp_path / f"{name}.png"
        p.write_bytes(data)
        new, old = _outcome(codecs._read_png, p), _outcome(_pypng, p)
        assert _same(new, old), (name, new if isinstance(new, tuple) else "array", old if isinstance(old, tuple) else "array")
        refused += isinstance(old, tuple)
    assert refused >= 6  # the set does hold refusals
