"""Data: image normalisation and optical-flow files.

This file holds everything that reads or writes data on disk. So far:
  * the ImageNet normalisation every network input goes through (stated once, here);
  * Middlebury `.flo` files (FlowNet2, RAFT and most flow codebases write them);
  * KITTI 2015 flow PNGs (16-bit RGB: the KITTI ground truth, and EFC Tables 2 and 5).

Arrays on disk are (H, W, 2) float32, u first (x, right), v second (y, down), in pixels; the
networks take (B, 2, H, W) tensors (see warp.py for the flow conventions).
"""
import struct
import zlib

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Normalisation. Images enter every network as (B, 3, H, W) float RGB in [0, 1], minus the
# ImageNet mean, divided by the ImageNet std (the statistics the pretrained ResNets were trained
# with). The photometric losses (EFC eqs. (6)-(7)) work on [0, 1] images: `denormalize` undoes this.
# ---------------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(like):
    mean = torch.tensor(IMAGENET_MEAN, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
    return mean, std


def normalize(rgb):
    """(B, 3, H, W) RGB in [0, 1] -> network input."""
    mean, std = _stats(rgb)
    return (rgb - mean) / std


def denormalize(image):
    """Network input (B, 3, H, W) -> RGB in [0, 1] (the inverse of `normalize`)."""
    mean, std = _stats(image)
    return image * std + mean


# ---------------------------------------------------------------------------------------------
# Middlebury .flo: float32 magic 202021.25 (the bytes "PIEH"), int32 width, int32 height, then
# H * W * 2 little-endian float32, row-major, u and v interleaved per pixel.
# ---------------------------------------------------------------------------------------------
FLO_MAGIC = 202021.25


def read_flo(path):
    """Read a Middlebury .flo file -> (H, W, 2) float32 array (u, v) in pixels."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12:
        raise ValueError(f"{path}: not a .flo file (only {len(data)} bytes; the header alone is 12)")
    magic, = struct.unpack("<f", data[:4])
    if magic != FLO_MAGIC:
        raise ValueError(f"{path}: not a .flo file (magic number {magic!r}, expected {FLO_MAGIC})")
    width, height = struct.unpack("<ii", data[4:12])
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: impossible .flo dimensions {width}x{height}")
    expected = 12 + 8 * width * height
    # A size check, not np.resize: a truncated file must fail, not be silently padded.
    if len(data) != expected:
        raise ValueError(f"{path}: .flo of {width}x{height} should be {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype="<f4", offset=12).reshape(height, width, 2).astype(np.float32)


def write_flo(path, flow):
    """Write an (H, W, 2) flow (u, v) in pixels to a Middlebury .flo file."""
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"{path}: flow to write must be (H, W, 2), got shape {flow.shape}")
    height, width = flow.shape[:2]
    with open(path, "wb") as f:
        f.write(struct.pack("<fii", FLO_MAGIC, width, height))
        f.write(np.ascontiguousarray(flow, dtype="<f4").tobytes())


# ---------------------------------------------------------------------------------------------
# 16-bit RGB PNG. KITTI stores flow as uint16 RGB, and Pillow decodes 16-bit RGB PNGs to 8 bits
# per channel without a warning (it keeps the high bytes). So the two functions below read and
# write that one PNG flavour themselves, with the standard library's zlib and numpy: chunks,
# CRCs, the five row filters of the PNG spec (ISO/IEC 15948, section 9). No extra dependency.
# ---------------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunks(path, data):
    """Yield (type, payload) of every chunk, checking lengths and CRCs."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path}: not a PNG file (bad signature)")
    pos = 8
    while True:
        if pos + 8 > len(data):
            raise ValueError(f"{path}: truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            raise ValueError(f"{path}: truncated PNG (chunk {kind!r} runs past the end of the file)")
        payload = data[pos + 8:pos + 8 + length]
        crc, = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(kind + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: corrupted PNG (CRC mismatch in chunk {kind!r})")
        yield kind, payload
        if kind == b"IEND":
            return
        pos = end


def _unfilter(path, raw, height, stride, bpp):
    """Undo the PNG row filters -> (height, stride) uint8. `bpp` = bytes per complete pixel."""
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{path}: PNG image data has {len(raw)} bytes, expected {height * (stride + 1)}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:]
        if kind == 0:  # None
            current = line.copy()
        elif kind == 1:  # Sub: x + left. A running sum per byte lane of the pixel, modulo 256.
            current = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up: x + above
            current = line + previous
        elif kind in (3, 4):  # Average and Paeth depend on the left byte just decoded: a byte loop.
            current = bytearray(line.tobytes())
            up = previous.tolist()
            for i in range(stride):
                left = current[i - bpp] if i >= bpp else 0
                if kind == 3:
                    predictor = (left + up[i]) >> 1
                else:
                    up_left = up[i - bpp] if i >= bpp else 0
                    p = left + up[i] - up_left
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - up_left)
                    predictor = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else up_left)
                current[i] = (current[i] + predictor) & 0xFF
            current = np.frombuffer(bytes(current), dtype=np.uint8)
        else:
            raise ValueError(f"{path}: corrupted PNG (unknown row filter {kind} in row {y})")
        out[y] = current
        previous = out[y]
    return out


def read_png16_rgb(path):
    """Read a 16-bit RGB PNG -> (H, W, 3) uint16, the exact stored values.

    Decoding speed: rows filtered with None/Sub/Up are vectorised; Average/Paeth rows (which
    libpng's adaptive filtering often picks) run a Python byte loop, about 0.8 s for a whole
    375 x 1242 KITTI image filtered that way. Reading ground truth for evaluation only, that is fine.
    """
    with open(path, "rb") as f:
        data = f.read()
    header, idat = None, []
    for kind, payload in _png_chunks(path, data):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
    if header is None:
        raise ValueError(f"{path}: corrupted PNG (no IHDR chunk)")
    width, height, depth, colour, _, _, interlace = header
    if (depth, colour, interlace) != (16, 2, 0):
        raise ValueError(f"{path}: expected a non-interlaced 16-bit RGB PNG (KITTI flow), "
                         f"got bit depth {depth}, colour type {colour}, interlace {interlace}")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"{path}: corrupted PNG image data ({e})") from None
    rows = _unfilter(path, raw, height, width * 6, bpp=6)
    return rows.view(">u2").reshape(height, width, 3).astype(np.uint16)


def write_png16_rgb(path, rgb):
    """Write (H, W, 3) uint16 as a 16-bit RGB PNG (rows unfiltered, zlib level 6)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint16:
        raise ValueError(f"{path}: expected an (H, W, 3) uint16 array, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    rows = rgb.astype(">u2").reshape(height, width * 6 // 2).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    png = (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


# ---------------------------------------------------------------------------------------------
# KITTI flow PNG: R = u * 64 + 2^15, G = v * 64 + 2^15, B = 1 where the flow is valid, else 0.
# ---------------------------------------------------------------------------------------------
def read_kitti_flow(path):
    """Read a KITTI flow PNG -> flow (H, W, 2) float32 in pixels, valid (H, W) bool.

    Invalid pixels (B == 0) are returned with flow exactly 0, whatever their R, G hold.
    """
    rgb = read_png16_rgb(path).astype(np.float32)
    valid = rgb[..., 2] > 0
    flow = (rgb[..., :2] - 2.0 ** 15) / 64.0
    flow[~valid] = 0.0
    return flow, valid


def write_kitti_flow(path, flow, valid=None):
    """Write flow (H, W, 2) in pixels and valid (H, W) bool (default: all valid) as a KITTI PNG.

    Values are rounded to the nearest 1/64 px. A valid value outside the 16-bit range
    [-512, 511.984375] px (or not finite) is refused, never wrapped or clipped; invalid
    pixels are written as zero flow with B = 0, whatever their values.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"{path}: flow to write must be (H, W, 2), got shape {flow.shape}")
    valid = np.ones(flow.shape[:2], bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != flow.shape[:2]:
        raise ValueError(f"{path}: valid mask {valid.shape} does not match flow {flow.shape[:2]}")
    coded = np.where(valid[..., None], np.rint(flow * 64.0 + 2.0 ** 15), 2.0 ** 15)
    bad = ~np.isfinite(coded) | (coded < 0) | (coded > 65535)
    if bad.any():
        y, x, c = np.argwhere(bad)[0]
        raise ValueError(f"{path}: flow {flow[y, x, c]!r} at (x={x}, y={y}) does not fit KITTI's 16-bit "
                         f"encoding (range [-512, 511.984375] px); {int(bad.sum())} value(s) out of range")
    rgb = np.dstack([coded, valid.astype(np.float64)]).astype(np.uint16)
    write_png16_rgb(path, rgb)
