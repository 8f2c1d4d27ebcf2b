"""Tests of the flow file readers and writers in data.py (.flo and KITTI 16-bit PNG)."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from data import (PNG_SIGNATURE, denormalize, normalize, read_flo, read_kitti_flow, read_png16_rgb, write_flo,
                  write_kitti_flow, write_png16_rgb)


def test_flo_round_trip_with_negative_and_fractional_values(tmp_path):
    rng = np.random.default_rng(0)
    flow = (rng.standard_normal((7, 11, 2)) * 123.456).astype(np.float32)
    flow[0, 0] = (-0.001, 1e-7)
    write_flo(tmp_path / "a.flo", flow)
    back = read_flo(tmp_path / "a.flo")
    assert back.dtype == np.float32 and back.shape == (7, 11, 2)
    assert np.array_equal(back, flow)
    # The layout on disk: header, then u, v interleaved row by row.
    raw = (tmp_path / "a.flo").read_bytes()
    assert raw[:4] == b"PIEH" and struct.unpack("<ii", raw[4:12]) == (11, 7)
    assert struct.unpack("<2f", raw[12:20]) == tuple(flow[0, 0])


def test_flo_errors_name_the_file(tmp_path):
    good = tmp_path / "good.flo"
    write_flo(good, np.zeros((3, 4, 2), np.float32))
    data = good.read_bytes()
    cases = {
        "magic.flo": (b"XXXX" + data[4:], "magic"),
        "short.flo": (data[:-5], "should be"),
        "long.flo": (data + b"\0" * 8, "should be"),
        "dims.flo": (data[:4] + struct.pack("<ii", -4, 3) + data[12:], "impossible"),
        "tiny.flo": (data[:6], "header"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message) as info:
            read_flo(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(ValueError, match="bad.flo"):
        write_flo(tmp_path / "bad.flo", np.zeros((3, 4)))


def test_kitti_round_trip_with_negative_fractional_and_invalid(tmp_path):
    rng = np.random.default_rng(1)
    flow = np.round(rng.uniform(-500, 500, (9, 13, 2)) * 64) / 64  # representable exactly
    flow[0, 0] = (-512.0, 511.984375)  # the two ends of the 16-bit range
    valid = rng.random((9, 13)) > 0.3
    valid[0, 0] = True
    write_kitti_flow(tmp_path / "f.png", flow, valid)
    back, back_valid = read_kitti_flow(tmp_path / "f.png")
    assert back.dtype == np.float32 and back_valid.dtype == bool
    assert np.array_equal(back_valid, valid)
    assert np.array_equal(back[valid], flow[valid].astype(np.float32))
    assert np.all(back[~valid] == 0)


def test_kitti_writer_rounds_to_nearest_sixty_fourth(tmp_path):
    flow = np.array([[[0.26 / 64, -0.74 / 64], [1.49 / 64, -1.51 / 64]]])  # (1, 2, 2)
    write_kitti_flow(tmp_path / "r.png", flow)
    back, _ = read_kitti_flow(tmp_path / "r.png")
    assert np.array_equal(back * 64, np.array([[[0, -1], [1, -2]]], np.float32))


def test_kitti_writer_refuses_values_that_do_not_fit(tmp_path):
    for bad in (512.0, -512.01, np.nan, np.inf):
        flow = np.zeros((2, 3, 2))
        flow[1, 2, 0] = bad
        with pytest.raises(ValueError, match="does not fit") as info:
            write_kitti_flow(tmp_path / "x.png", flow)
        assert "x.png" in str(info.value) and "x=2, y=1" in str(info.value)
    # ...unless the pixel is invalid: its value is not stored.
    flow = np.zeros((2, 3, 2))
    flow[1, 2] = np.nan
    valid = np.ones((2, 3), bool)
    valid[1, 2] = False
    write_kitti_flow(tmp_path / "ok.png", flow, valid)
    assert read_kitti_flow(tmp_path / "ok.png")[1].sum() == 5


def png_with_filters(rgb16, filters):
    """An independent PNG encoder that applies the given row filter to each row (PNG spec, 9.2)."""
    h, w, _ = rgb16.shape
    rows = rgb16.astype(">u2").reshape(h, w * 3).view(np.uint8).astype(np.int64)
    bpp = 6
    out = bytearray()
    for y in range(h):
        kind = filters[y % len(filters)]
        line, prev = rows[y], rows[y - 1] if y else np.zeros_like(rows[0])
        left = np.concatenate([np.zeros(bpp, np.int64), line[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(line)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - up_left
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
        out.append(kind)
        out += ((line - pred) % 256).astype(np.uint8).tobytes()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"tEXt", b"Comment\0ancillary chunks are skipped")
            + chunk(b"IDAT", zlib.compress(bytes(out))[:20]) + chunk(b"IDAT", zlib.compress(bytes(out))[20:])
            + chunk(b"IEND", b""))


def test_png16_reader_undoes_every_filter_exactly(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 65536, (10, 9, 3), dtype=np.uint16)
    rgb[3:6] = rgb[3:6] // 700 + 30000  # smooth rows, where Paeth and Average make a difference
    (tmp_path / "f.png").write_bytes(png_with_filters(rgb, [0, 1, 2, 3, 4, 4, 3, 2, 1]))
    decoded = read_png16_rgb(tmp_path / "f.png")
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, rgb)
    # An independent decoder agrees: Pillow keeps the high byte of each 16-bit sample.
    assert np.array_equal(np.array(Image.open(tmp_path / "f.png")), (rgb >> 8).astype(np.uint8))
    write_png16_rgb(tmp_path / "g.png", rgb)
    assert np.array_equal(read_png16_rgb(tmp_path / "g.png"), rgb)


def test_corrupted_pngs_raise_naming_the_file(tmp_path):
    flow = np.zeros((4, 5, 2))
    write_kitti_flow(tmp_path / "good.png", flow)
    data = (tmp_path / "good.png").read_bytes()
    idat = data.index(b"IDAT")
    flipped = bytearray(data)
    flipped[idat + 6] ^= 0xFF
    cases = {
        "crc.png": (bytes(flipped), "CRC"),
        "trunc.png": (data[: len(data) - 20], "truncated"),
        "sig.png": (b"GIF89a" + data[6:], "signature"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message) as info:
            read_kitti_flow(tmp_path / name)
        assert name in str(info.value)
    (tmp_path / "empty.png").write_bytes(png_with_filters(np.zeros((0, 0, 3), np.uint16), [0]))  # 0x0 pixels
    with pytest.raises(ValueError, match="empty.png: PNG of 0x0 pixels"):
        read_kitti_flow(tmp_path / "empty.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(ValueError, match="16-bit RGB") as info:
        read_kitti_flow(tmp_path / "eight.png")
    assert "eight.png" in str(info.value)


def test_normalize_round_trip():
    rgb = torch.rand(2, 3, 4, 5)
    assert torch.allclose(denormalize(normalize(rgb)), rgb, atol=1e-6)
    assert torch.allclose(normalize(torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)), torch.zeros(1, 3, 1, 1))
