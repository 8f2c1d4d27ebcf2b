"""The synthetic world: a small stand-in for Cityscapes whose ground truth is exact for every frame.

What it holds
  the renderer            _Scene: a driving camera over a textured plane, cars (moving and parked,
                          drawn from one sprite generator), people and bicycles, with exact labels,
                          forward / backward flow and occlusion for every frame
  the writer              make_synthetic_world: 30-frame snippets in the Cityscapes layout
                          (leftImg8bit_sequence, gtFine for the 20th frame, gt_all for every frame,
                          flow_fw / flow_bw as KITTI 16-bit PNGs, occ_fw), deterministic per seed,
                          written in parallel, with a completion marker (data.world_is_incomplete)
  a picture               preview: image | labels | flow | occlusion of a few snippets
  the command line        `python synthetic.py synth --out DIR`, `python synthetic.py preview --root DIR --out PNG`

Why a world of our own: both papers train on Cityscapes, whose 29 unlabelled frames per snippet
carry no flow ground truth. Here every frame has its labels and its true flow, so the mechanisms of
both papers can be checked (EFC: does the unsupervised flow find the motion, does warping tie the
segmentations of neighbouring frames together; Flow2Seg: do two cars that look alike and differ
only in motion get told apart by the flow path) on a CPU in minutes. The layout, the class list and
the completion marker, which the dataset readers depend on, live in data.py (section 4); this file
only renders and writes. Nothing here is in either paper.
"""
import argparse
import json
import os
import shutil
import time
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import fcntl  # the lock of write_world_once (POSIX); without it concurrent first runs are not serialised
except ImportError:
    fcntl = None

from data import (BICYCLE, BUILDING, CAR_MOVING, CAR_PARKED, INCOMPLETE_MARKER, LABELLED_INDEX, PERSON, ROAD,
                  SIDEWALK, SKY, SNIPPET_LENGTH, SYNTH_CLASSES, SYNTH_DEFAULT_ROOT, SYNTH_FOLDERS, SYNTH_PALETTE,
                  VEGETATION, _cityscapes_labelled, _lut, colorize, flow_to_color, one_line_errors, progress,
                  read_image, read_kitti_flow, read_label, train_id_lut, write_kitti_flow)

# =============================================================================================
# How the world is made
#
#
# A small stand-in for Cityscapes whose ground truth is exact for every frame: labels, forward and
# backward flow, occlusion. Each 30-frame snippet is rendered in layers on one plane:
#   * the static scene (road, sidewalk, building, vegetation, sky) is a textured canvas seen
#     through a camera that pans and zooms: pixel p of frame t sees the world point
#         X = o_t + s_t (p - c)          (c the image centre, s_t world units per pixel);
#   * objects (cars, people, bicycles) are textured sprites with their own translations q_t,
#     composited far to near; the material point at sprite coordinate L is at X = q_t + L.
# Every pixel shows the frontmost surface at its centre, so the flow is exact: the point X seen at
# p in frame t is at X + (q_{t+1} - q_t) in frame t+1 (q constant for the static scene), i.e. at
#     p' = c + (X + q_{t+1} - q_t - o_{t+1}) / s_{t+1},   F_t->t+1(p) = p' - p.
# A pixel of t is occluded (no correspondence in t+1) where a nearer sprite covers p' at t+1, or p'
# leaves the image. Colours are sampled bilinearly from the textures at X, so warping frame t+1 by
# the flow reproduces frame t up to interpolation error, the 1/64-px rounding of the KITTI PNG and
# the brightness change below. Labels take the class of the texel nearest X.
# Motion (a driving camera at 128x256; measured on 10 train snippets of seed 0): the static scene
# moves |F| = 5.8 px/frame at the median, 8.8 at p90; moving cars 7-14 px/frame (p10-p90) relative
# to the road under them. Much more than Cityscapes' per-frame motion at this scale, on purpose: a
# flow network must find displacements of a whole stride-8 cell and more to be worth anything here.
#
# Flow2Seg's premise is built in: car_moving and car_parked come from one sprite generator (each
# sprite is used once as a parked and once as a moving car, at the same height distribution), so
# appearance and position say nothing about the class; a parked car moves exactly with the static
# scene, a moving one does not.
# Brightness (our choice of "mild"): a global gain per frame, starting in [0.95, 1.05] and changing
# by at most 1 % from one frame to the next, kept in [0.9, 1.1]; textures stay in [0.04, 0.88], so
# no pixel clips.
# =============================================================================================
SNIPPETS_PER_CITY = 10  # snippets per "city" folder (synth0, synth1, .., synthval0, ..)
FRAME_SIZE = (128, 256)  # (H, W) of the default world's frames: Cityscapes' 1:2 at 1/8 of 1024x2048

Sprite = namedtuple("Sprite", "cls texture mask pos")  # texture (h, w, 3), mask (h, w) bool, pos (T, 2) of texel (0, 0)


def _bilinear(texture, x, y):
    """Sample texture (h, w, C) at real texel coordinates x, y (equal shapes) -> (*x.shape, C).

    Texel (i, j) is at x = j, y = i; coordinates outside [0, w-1] x [0, h-1] take the edge value.
    """
    h, w = texture.shape[:2]
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0 = np.minimum(np.floor(x), w - 2).astype(np.int64)  # x = w-1 uses the last cell with weight 1
    y0 = np.minimum(np.floor(y), h - 2).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    flat, i = texture.reshape(h * w, -1), y0 * w + x0  # one flat index per sample: faster than two
    top = flat[i] + fx * (flat[i + 1] - flat[i])
    bottom = flat[i + w] + fx * (flat[i + w + 1] - flat[i + w])
    return top + fy * (bottom - top)


def _lerp_along(array, coords, axis):
    """Linear interpolation of `array` at real indices `coords` (1-D) along `axis`, edges replicated."""
    n = array.shape[axis]
    coords = np.clip(coords, 0, n - 1)
    i0 = np.minimum(np.floor(coords), n - 2).astype(np.int64)
    f = (coords - i0).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    a0 = array.take(i0, axis)
    return a0 + f * (array.take(i0 + 1, axis) - a0)


def _smooth_noise(rng, shape, cell):
    """Random values in [0, 1] on a grid of spacing `cell` texels, bilinearly interpolated: (h, w)."""
    h, w = shape
    grid = rng.random((int(h / cell) + 2, int(w / cell) + 2, 1))
    y, x = np.mgrid[0:h, 0:w] / cell
    return _bilinear(grid, x, y)[..., 0]


def _finish_texture(texture):
    """Blur by [1, 2, 1] / 4 along both axes (edges replicated), which removes single-texel detail
    that bilinear resampling cannot carry from one frame to the next, and keep the colours in
    [0.04, 0.88], so that no brightness gain in [0.9, 1.1] clips."""
    for axis in (0, 1):
        p = np.concatenate([texture.take([0], axis), texture, texture.take([-1], axis)], axis)
        n = texture.shape[axis]
        texture = 0.25 * p.take(range(0, n), axis) + 0.5 * texture + 0.25 * p.take(range(2, n + 2), axis)
    return np.clip(texture, 0.04, 0.88)


def _segment_distance(x, y, a, b):
    """Distance of points (x, y) to the segment a-b (2-tuples)."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    f = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(x - ax - f * dx, y - ay - f * dy)


def _sprite_coords(h, w):
    """Texel grid of a sprite: u, v in (0, 1) across its width and height; x, y in texels."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return (x + 0.5) / w, (y + 0.5) / h, x, y


CAR_COLOURS = ((0.75, 0.12, 0.1), (0.12, 0.2, 0.6), (0.85, 0.85, 0.82), (0.55, 0.56, 0.58), (0.12, 0.12, 0.14),
               (0.1, 0.4, 0.22), (0.85, 0.7, 0.12))


def _car_sprite(rng, height):
    """A car: rounded body, cabin with windows, two wheels. The one generator of both car classes."""
    length = rng.uniform(0.45, 0.7) * height
    h, w = max(4, round(length * rng.uniform(0.38, 0.46))), max(6, round(length))
    u, v, x, y = _sprite_coords(h, w)
    if rng.random() < 0.5:  # facing left or right
        u = 1 - u
    body = ((u - 0.5) / 0.49) ** 6 + ((v - 0.62) / 0.24) ** 6 <= 1
    cabin = (v >= 0.06) & (v <= 0.42) & (u >= 0.2 + 0.15 * (0.42 - v)) & (u <= 0.75 - 0.1 * (0.42 - v))
    glass = ((v >= 0.13) & (v <= 0.4) & (u >= 0.26 + 0.15 * (0.42 - v)) & (u <= 0.69 - 0.1 * (0.42 - v))
             & (np.abs(u - 0.48) > 0.025))
    r = 0.17 * h
    hub = np.minimum(np.hypot(x + 0.5 - 0.23 * w, y + 0.5 - 0.84 * h), np.hypot(x + 0.5 - 0.77 * w, y + 0.5 - 0.84 * h))
    colour = np.array(CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
    texture = colour * (1.08 - 0.25 * v)[..., None] * (0.92 + 0.16 * _smooth_noise(rng, (h, w), 3))[..., None]
    texture[glass] = np.array([0.2, 0.25, 0.33]) + 0.15 * (1 - v[glass])[:, None]
    texture[hub <= r] = 0.08
    texture[hub <= 0.45 * r] = 0.5
    return _finish_texture(texture), body | cabin | (hub <= r)


def _person_sprite(rng, height):
    """A pedestrian: head, torso, two legs; random skin, shirt and trouser colours."""
    h = max(6, round(rng.uniform(0.2, 0.28) * height))
    w = max(3, round(0.34 * h))
    u, v, x, y = _sprite_coords(h, w)
    head = np.hypot((u - 0.5) * w, (v - 0.09) * h) <= 0.085 * h
    torso = ((u - 0.5) / 0.4) ** 4 + ((v - 0.37) / 0.19) ** 4 <= 1
    legs = (v >= 0.54) & ((np.abs(u - 0.31) <= 0.14) | (np.abs(u - 0.69) <= 0.14))
    skins = ((0.85, 0.68, 0.55), (0.6, 0.42, 0.3), (0.35, 0.24, 0.18))
    texture = np.empty((h, w, 3))
    texture[...] = rng.uniform(0.1, 0.45, 3)  # trousers
    texture[v < 0.56] = rng.uniform(0.15, 0.88, 3)  # shirt
    texture[v < 0.17] = skins[rng.integers(len(skins))]
    texture *= (0.9 + 0.2 * _smooth_noise(rng, (h, w), 2.5))[..., None]
    return _finish_texture(texture), head | torso | legs


def _bicycle_sprite(rng, height):
    """A bicycle: two wheels (tyre and lighter spokes) and a bright frame of thick segments."""
    h = max(5, round(rng.uniform(0.13, 0.17) * height))
    w = round(1.75 * h)
    u, v, x, y = _sprite_coords(h, w)
    px, py = x + 0.5, y + 0.5
    r = 0.3 * h
    wheel = np.minimum(np.hypot(px - 0.22 * w, py - 0.68 * h), np.hypot(px - 0.78 * w, py - 0.68 * h))
    points = {k: (a * w, b * h) for k, (a, b) in dict(rear=(0.22, 0.68), crank=(0.45, 0.68), seat=(0.35, 0.32),
                                                      head=(0.7, 0.32), front=(0.78, 0.68), bar=(0.72, 0.1)).items()}
    segments = (("rear", "crank"), ("crank", "seat"), ("seat", "head"), ("crank", "head"), ("head", "front"),
                ("head", "bar"))
    frame = np.min([_segment_distance(px, py, points[a], points[b]) for a, b in segments], axis=0) <= max(0.7, 0.06 * h)
    texture = np.empty((h, w, 3))
    texture[...] = rng.choice([0.1, 0.85], 3) * 0.8 + rng.uniform(0.05, 0.15, 3)  # a bright frame colour
    texture[wheel <= r] = 0.1
    texture[wheel <= 0.75 * r] = 0.6
    return _finish_texture(texture), (wheel <= r) | frame


def _background(rng, xs, ys, height, unit):
    """The static scene on a canvas of texels at world coordinates xs (columns), ys (rows).

    Bands from the top (v = 0 at the top of frame 0, 1 at its bottom): sky, then blocks of
    building or vegetation along x with their own top lines, then the sidewalk, then the road.
    Returns label (Hc, Wc) uint8, texture (Hc, Wc, 3) in [0.04, 0.88], road_top and kerb (in v).
    """
    shape = (len(ys), len(xs))
    Y, X = np.meshgrid(ys, xs, indexing="ij")
    v = (Y + (height - 1) / 2) / height

    def noise(cell):  # detail no finer than 2 texels, at any image size
        return _smooth_noise(rng, shape, max(2.0, cell * unit))

    road_top = rng.uniform(0.68, 0.74)
    kerb = road_top - rng.uniform(0.08, 0.12)
    # Blocks of building or vegetation along x, each column knowing its block's left edge and top.
    edges, kinds, tops = [xs[0]], [], []
    while edges[-1] <= xs[-1]:
        kinds.append(BUILDING if rng.random() < 0.6 else VEGETATION)
        tops.append(rng.uniform(0.05, 0.35) if kinds[-1] == BUILDING else rng.uniform(0.2, 0.42))
        edges.append(edges[-1] + rng.uniform(0.25, 0.7) * height)
    block = np.searchsorted(edges, xs, side="right") - 1  # (Wc,) block index of every column
    kind, top, left = np.array(kinds)[block], np.array(tops)[block], np.array(edges)[block]
    top = top + np.where(kind == VEGETATION, 0.08 * (_smooth_noise(rng, (1, len(xs)), 6)[0] - 0.5), 0)

    label = np.full(shape, SKY, dtype=np.uint8)
    label = np.where(v >= top, kind, label)
    label[v >= kerb] = SIDEWALK
    label[v >= road_top] = ROAD

    texture = np.zeros(shape + (3,))
    sky = np.clip((v + 0.2) / 0.6, 0, 1)[..., None] * np.array([0.3, 0.23, 0.06]) + np.array([0.4, 0.55, 0.82])
    clouds = np.clip((noise(40) + 0.5 * noise(12) - 0.85) * 4, 0, 1)[..., None]
    texture = np.where((label == SKY)[..., None], sky * (1 - clouds) + 0.86 * clouds, texture)

    facade = np.array([(0.55, 0.45, 0.38), (0.6, 0.6, 0.58), (0.72, 0.66, 0.52), (0.45, 0.42, 0.45), (0.66, 0.5, 0.42)])
    wall = facade[rng.integers(len(facade), size=len(edges))[block]] * (0.9 + 0.2 * noise(8))[..., None]
    period_x, period_y = max(5.0, 11 * unit), max(6.0, 13 * unit)
    window = (((X - left) % period_x) > 0.35 * period_x) & (((Y - top * height) % period_y) > 0.35 * period_y)
    wall = np.where(window[..., None], np.array([0.16, 0.2, 0.28]) + 0.1 * noise(3)[..., None], wall)
    texture = np.where((label == BUILDING)[..., None], wall, texture)

    leaves = np.array([0.16, 0.38, 0.1]) * (0.55 + 0.9 * (0.5 * noise(10) + 0.3 * noise(4) + 0.2 * noise(2)))[..., None]
    texture = np.where((label == VEGETATION)[..., None], leaves, texture)

    tiles = ((X % max(4.0, 14 * unit)) < 1.5) | ((Y % max(3.0, 6 * unit)) < 1.2)
    pavement = np.array([0.62, 0.58, 0.57]) * ((0.92 + 0.16 * noise(6)) * np.where(tiles, 0.75, 1.0))[..., None]
    texture = np.where((label == SIDEWALK)[..., None], pavement, texture)

    lane = (np.abs(v - (road_top + 1) / 2) * height < max(1.0, 1.5 * unit)) & ((X % (32 * unit)) < 16 * unit)
    asphalt = (0.36 + 0.08 * (noise(3) - 0.5) + 0.05 * (noise(20) - 0.5))[..., None] * np.array([1.0, 1.0, 1.05])
    asphalt = np.where(lane[..., None], 0.8, asphalt)
    texture = np.where((label == ROAD)[..., None], asphalt, texture)
    return label.astype(np.uint8), _finish_texture(texture), road_top, kerb


class _Scene:
    """One snippet: camera path (o, s), brightness gains, the static canvas, the sprites far to near."""

    def __init__(self, rng, height, width):
        T, L = SNIPPET_LENGTH, LABELLED_INDEX
        unit = height / 128  # sizes and speeds below are stated for a 128-pixel-high image
        t = np.arange(T, dtype=np.float64)
        self.height, self.width = height, width
        self.c = np.array([(width - 1) / 2, (height - 1) / 2])
        # Camera, as a car driving down a street seen at 128x256: it moves forward, which on one
        # plane is a zoom about the image centre of z = 1-4 %/frame (the corner pixels stream outward
        # by up to ~6 px/frame), and turns, a pan of 1.5-9 px/frame of either sign, plus a slight tilt
        # and bounce. s_t = exp(-z (t - L)) world units per pixel (1 at the labelled frame, smaller
        # later: the view narrows as the camera advances). Every motion is stated in pixels per frame:
        # a step of m px from frame t to t+1 is m * s_{t+1} world units.
        zoom = rng.uniform(0.01, 0.04)
        self.s = np.exp(-zoom * (t - L))  # (T,)
        pan = rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 9.0) * unit
        tilt = rng.uniform(-0.3, 0.3) * unit
        bounce = rng.uniform(0, 0.5) * unit * np.sin(2 * np.pi * t / rng.uniform(6, 12) + rng.uniform(0, 2 * np.pi))
        self.o = np.stack([self.travel(pan), self.travel(tilt) + bounce * self.s], axis=1)  # (T, 2)
        self.gain = np.clip(rng.uniform(0.95, 1.05) * np.cumprod(1 + rng.uniform(-0.01, 0.01, T)), 0.9, 1.1)

        # The canvas covers every frame's view plus a margin of 4 texels.
        corners = np.array([[0, 0], [width - 1, height - 1]], dtype=np.float64)
        seen = self.o[:, None] + self.s[:, None, None] * (corners - self.c)  # (T, 2 corners, 2)
        lo, hi = np.floor(seen.min(axis=(0, 1))) - 4, np.ceil(seen.max(axis=(0, 1))) + 4
        self.x0, self.y0 = lo
        xs, ys = np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1)
        self.label, self.texture, road_top, kerb = _background(rng, xs, ys, height, unit)

        # Sprites, placed by where they are at the labelled frame: the first `central` of each class
        # inside the central 80 % of the view (so every class is on screen there), the others up to
        # a third of a view outside it (they enter or leave the frame). Depth = the v of the bottom.
        view_lo = self.o[L, 0] - self.s[L] * self.c[0]
        span = 2 * self.s[L] * self.c[0]
        sprites = []

        def add(cls, texture, mask, bottom, speed, central, bob=0.0):
            h, w = mask.shape
            xc = view_lo + span * (rng.uniform(0.1, 0.9) if central else rng.uniform(-0.3, 1.3))
            wobble = bob * np.sin(2 * np.pi * t / 8 + rng.uniform(0, 2 * np.pi))  # a walking bob
            pos = np.stack([xc - w / 2 + self.travel(speed), np.full(T, bottom * height - self.c[1] - h) + wobble],
                           axis=1)
            sprites.append((bottom + 1e-3 * rng.random(), Sprite(cls, texture, mask, pos)))

        def side():
            return rng.choice([-1.0, 1.0])

        # Cars: 3-5 of each class, the first two of each on screen at the labelled frame. Moving cars
        # move 6-16 px/frame relative to the road (as overtaking and oncoming traffic does on a
        # 256-pixel-wide frame); a parked car is a sprite with speed 0: it moves exactly with the road.
        for k in range(rng.integers(3, 6)):
            texture, mask = _car_sprite(rng, height)
            add(CAR_PARKED, texture, mask, rng.uniform(road_top + 0.1, 1.02), 0.0, k < 2)
            speed = side() * rng.uniform(6, 16) * unit
            add(CAR_MOVING, texture, mask, rng.uniform(road_top + 0.1, 1.02), speed, k < 2)
        for k in range(rng.integers(2, 5)):
            add(PERSON, *_person_sprite(rng, height), rng.uniform(kerb + 0.03, road_top + 0.02),
                side() * rng.uniform(0.4, 1.0) * unit, k == 0, bob=0.5 * unit)
        for k in range(rng.integers(1, 3)):
            add(BICYCLE, *_bicycle_sprite(rng, height), rng.uniform(road_top + 0.04, road_top + 0.12),
                side() * rng.uniform(1.0, 2.5) * unit, k == 0)
        self.sprites = [sprite for _, sprite in sorted(sprites, key=lambda d: d[0])]  # far to near

    def travel(self, speed):
        """World position (T,) of a point moving `speed` px/frame across the image, 0 at the labelled
        frame: its step from t to t+1 is speed * s_{t+1} world units = speed pixels of frame t+1."""
        steps = np.concatenate([[0.0], np.cumsum(speed * self.s[1:])])  # (T,) travelled since frame 0
        return steps - steps[LABELLED_INDEX]

    def to_world(self, t, px, py):
        return self.o[t, 0] + self.s[t] * (px - self.c[0]), self.o[t, 1] + self.s[t] * (py - self.c[1])

    def to_pixel(self, t, X, Y):
        return self.c[0] + (X - self.o[t, 0]) / self.s[t], self.c[1] + (Y - self.o[t, 1]) / self.s[t]

    def frontmost(self, t, X, Y):
        """Which surface is frontmost at world points (X, Y) in frame t: -1 for the static scene,
        else the sprite's depth rank (larger = nearer). A sprite covers a point when the texel
        nearest the point's sprite coordinate is inside its mask."""
        front = np.full(X.shape, -1, dtype=np.int64)
        lo, hi = (X.min(), Y.min()), (X.max(), Y.max())
        for k, sprite in enumerate(self.sprites):
            h, w = sprite.mask.shape
            x, y = sprite.pos[t]
            if x - 1 > hi[0] or y - 1 > hi[1] or x + w < lo[0] or y + h < lo[1]:
                continue  # nowhere near the points
            ix, iy = np.rint(X - x).astype(np.int64), np.rint(Y - y).astype(np.int64)
            inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
            if inside.any():
                hit = np.zeros_like(inside)
                hit[inside] = sprite.mask[iy[inside], ix[inside]]
                front[hit] = k
        return front

    def render(self, t):
        """Frame t -> dict: image (H, W, 3) uint8, label (H, W) uint8, and where the neighbours exist
        flow_fw = F_t->t+1, flow_bw = F_t->t-1 ((H, W, 2) float64 px), occ_fw (H, W) bool."""
        H, W = self.height, self.width
        py, px = np.mgrid[0:H, 0:W].astype(np.float64)
        X, Y = self.to_world(t, px, py)
        front = self.frontmost(t, X, Y)
        # The static scene: X depends on the column only and Y on the row only, so the bilinear
        # sampling is done as two 1-D interpolations (the same numbers, several times faster).
        cols, rows = X[0] - self.x0, Y[:, 0] - self.y0
        rgb = _lerp_along(_lerp_along(self.texture, rows, 0), cols, 1)  # (H, W, 3)
        label = self.label[np.ix_(np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64))]
        steps = {dt: np.zeros((H, W, 2)) for dt in (-1, 1) if 0 <= t + dt < SNIPPET_LENGTH}  # world motion
        for k, sprite in enumerate(self.sprites):
            m = front == k
            if m.any():
                rgb[m] = _bilinear(sprite.texture, X[m] - sprite.pos[t, 0], Y[m] - sprite.pos[t, 1])
                label[m] = sprite.cls
                for dt, step in steps.items():
                    step[m] = sprite.pos[t + dt] - sprite.pos[t]
        frame = {"image": np.rint(np.clip(self.gain[t] * rgb, 0, 1) * 255).astype(np.uint8), "label": label}
        for dt, step in steps.items():
            Xn, Yn = X + step[..., 0], Y + step[..., 1]  # where the visible points are in frame t + dt
            qx, qy = self.to_pixel(t + dt, Xn, Yn)
            frame["flow_fw" if dt == 1 else "flow_bw"] = np.stack([qx - px, qy - py], axis=-1)
            if dt == 1:
                inside = (qx >= 0) & (qx <= W - 1) & (qy >= 0) & (qy <= H - 1)
                frame["occ_fw"] = ~inside | (self.frontmost(t + 1, Xn, Yn) > front)
        return frame


def _save_png(path, array):
    Image.fromarray(array).save(path, compress_level=1)  # level 1: 3x faster than the default 6, files 15 % larger


def _synth_city(split, index):
    """City name and sequence number of a split's index-th snippet: train synth0.., val synthval0..."""
    return f"synth{'val' if split == 'val' else ''}{index // SNIPPETS_PER_CITY}", index % SNIPPETS_PER_CITY


def _write_snippet(job):
    """Render one snippet and write its 30 frames and ground truth (runs in a worker process)."""
    out, split, index, seed, height, width = job
    rng = np.random.default_rng([seed, ("train", "val").index(split), index])
    start = int(rng.integers(0, 100))  # the snippet's first frame number: the labelled one is start + 19
    scene = _Scene(rng, height, width)
    city, seq = _synth_city(split, index)
    folder = {name: out / name / split / city for name in SYNTH_FOLDERS}
    for i in range(SNIPPET_LENGTH):
        frame = scene.render(i)
        prefix = f"{city}_{seq:06d}_{start + i:06d}"
        _save_png(folder["leftImg8bit_sequence"] / f"{prefix}_leftImg8bit.png", frame["image"])
        _save_png(folder["gt_all"] / f"{prefix}_gtFine_labelTrainIds.png", frame["label"])
        if i == LABELLED_INDEX:
            _save_png(folder["gtFine"] / f"{prefix}_gtFine_labelTrainIds.png", frame["label"])
        if "flow_fw" in frame:
            write_kitti_flow(folder["flow_fw"] / f"{prefix}_leftImg8bit_flow.png", frame["flow_fw"])
            _save_png(folder["occ_fw"] / f"{prefix}_leftImg8bit_occ.png", frame["occ_fw"].astype(np.uint8) * 255)
        if "flow_bw" in frame:
            write_kitti_flow(folder["flow_bw"] / f"{prefix}_leftImg8bit_flow.png", frame["flow_bw"])


def make_synthetic_world(out=SYNTH_DEFAULT_ROOT, num_train=40, num_val=10, size=FRAME_SIZE, seed=0, workers=None,
                         overwrite=False):
    """Write the synthetic world under `out` in the Cityscapes layout (see docs/data.md).

    Snippets of a split are grouped into cities of SNIPPETS_PER_CITY: train cities synth0, synth1..,
    val cities synthval0...; every snippet's content depends only on (seed, split, index), so the
    files are byte-identical for the same seed whatever `workers` is. `workers` processes render
    snippets in parallel (default: every CPU core). An existing non-empty `out` is refused unless
    `overwrite`, which deletes the world's own folders and classes.json there first.
    Interruption: the marker INCOMPLETE_MARKER is written first and removed after classes.json, the
    last file; every reader (world_is_incomplete, _dataset_classes) refuses a world that has it.
    The worker processes die with this one (Linux: PR_SET_PDEATHSIG), even when it is SIGKILLed.
    """
    out = Path(out)
    height, width = int(size[0]), int(size[1])
    if height < 32 or width < 32:
        raise ValueError(f"synthetic world size {height}x{width}: height and width must be at least 32 pixels")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        for name in SYNTH_FOLDERS:
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "classes.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE_MARKER).write_text("the synthetic world is being written; if no writer runs, it was "
                                         "interrupted: write it again with `python synthetic.py synth --overwrite`\n")
    jobs = []
    for split, count in (("train", num_train), ("val", num_val)):
        for index in range(count):
            jobs.append((out, split, index, seed, height, width))
            for name in SYNTH_FOLDERS:
                (out / name / split / _synth_city(split, index)[0]).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_die_with_parent) as pool:
            list(progress(pool.map(_write_snippet, jobs), len(jobs), f"writing the world: snippets"))
    else:
        for job in progress(jobs, len(jobs), "writing the world: snippets"):
            _write_snippet(job)
    info = {"names": list(SYNTH_CLASSES), "palette": [list(c) for c in SYNTH_PALETTE], "ignore": 255,
            "size": [height, width], "train": num_train, "val": num_val, "seed": seed,
            "snippet_length": SNIPPET_LENGTH, "labelled_index": LABELLED_INDEX}
    (out / "classes.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / INCOMPLETE_MARKER).unlink()
    return out


def is_complete_world(root):
    """True for a folder holding a finished world (classes.json written last, no INCOMPLETE_MARKER)."""
    root = Path(root)
    return (root / "classes.json").is_file() and not (root / INCOMPLETE_MARKER).exists()


def write_world_once(out=SYNTH_DEFAULT_ROOT, log=print, **world):
    """The world at `out`, written by one run even when several start at once (two terminals, a
    test runner): a lock file beside `out` lets one writer in; the others wait, then find the world
    written. The writer fills a temporary folder beside `out` and renames it into place, so no run
    ever reads half a world. A writer killed midway leaves its temporary folder, removed by the next
    writer (it holds the lock, so nobody else is writing there); an incomplete world at `out` (from
    `synthetic.py synth` interrupted) is replaced. `world`: make_synthetic_world's keywords."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"waiting for another run that is writing the synthetic world to {out} ...")
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when that run's file closes, even if it was killed
        if is_complete_world(out):
            return out
        log(f"writing the synthetic world to {out} once (`python synthetic.py synth`; 20-25 s on 2 cores, 221 MB "
            "at the default size) ...")
        for stale in out.parent.glob(f".{out.name}.writing-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.writing-{os.getpid()}"
        make_synthetic_world(tmp, **world)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    return out


def _die_with_parent():
    """Worker initializer: ask Linux to SIGKILL this worker when its parent dies, so that killing the
    generator (even with SIGKILL, which it cannot catch) leaves no process writing. Elsewhere a no-op."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def preview(root, out, split="train", rows=3):
    """A picture of a synthetic world: for the labelled frame of the first `rows` snippets,
    image | labels | flow F_t->t+1 (Middlebury colours) | occlusion (white = occluded)."""
    root = Path(root)
    if not (root / "classes.json").is_file():
        raise FileNotFoundError(f"{root / 'classes.json'} not found: preview expects a world written by "
                                "`python synthetic.py synth`")
    palette = json.loads((root / "classes.json").read_text())["palette"]
    lut = train_id_lut(len(palette))
    strips = []
    for city, seq, frame, label_path in _cityscapes_labelled(root, split)[:rows]:
        prefix = f"{split}/{city}/{city}_{seq}_{frame:06d}"
        flow, _ = read_kitti_flow(root / "flow_fw" / f"{prefix}_leftImg8bit_flow.png")
        occ = read_label(root / "occ_fw" / f"{prefix}_leftImg8bit_occ.png", _lut({0: 0, 255: 255}), "0 and 255")
        tiles = [read_image(root / "leftImg8bit_sequence" / f"{prefix}_leftImg8bit.png"),
                 colorize(read_label(label_path, lut, "the world's classes"), palette),
                 flow_to_color(flow), np.repeat(occ.astype(np.uint8)[..., None], 3, axis=2)]
        gap = np.full((tiles[0].shape[0], 2, 3), 255, dtype=np.uint8)
        strips.append(np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1))
        strips.append(np.full((2, strips[-1].shape[1], 3), 255, dtype=np.uint8))
    Image.fromarray(np.concatenate(strips[:-1], axis=0)).save(out, optimize=True)


# =============================================================================================
# Command line
# =============================================================================================
def main():
    parser = argparse.ArgumentParser(description="The synthetic world and pictures of it (docs/data.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a synthetic world in the Cityscapes layout")
    synth.add_argument("--out", default=SYNTH_DEFAULT_ROOT, help="output folder (default: %(default)s)")
    synth.add_argument("--train", type=int, default=40, help="training snippets (default: %(default)s)")
    synth.add_argument("--val", type=int, default=10, help="validation snippets (default: %(default)s)")
    synth.add_argument("--size", type=int, nargs=2, default=FRAME_SIZE, metavar=("H", "W"),
                       help="frame size (default: 128 256)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    synth.add_argument("--overwrite", action="store_true", help="replace a world already in --out")
    show = commands.add_parser("preview", help="a PNG of a synthetic world's frames, labels, flow and occlusion")
    show.add_argument("--root", required=True, help="a folder written by `synth`")
    show.add_argument("--out", required=True, help="the PNG to write")
    show.add_argument("--split", default="train")
    show.add_argument("--rows", type=int, default=3, help="snippets to show (default: %(default)s)")
    args = one_line_errors(parser).parse_args()
    try:
        if args.command == "synth":
            if args.train < 0 or args.val < 0:
                parser.error(f"--train {args.train} --val {args.val}: snippet counts must be >= 0")
            start = time.perf_counter()
            make_synthetic_world(args.out, args.train, args.val, args.size, args.seed, args.workers, args.overwrite)
            print(f"wrote {args.train} + {args.val} snippets of {SNIPPET_LENGTH} frames "
                  f"({args.size[0]}x{args.size[1]}) to {args.out} in {time.perf_counter() - start:.1f} s")
        else:
            preview(args.root, args.out, args.split, args.rows)
            print(f"wrote {args.out}")
    except (OSError, ValueError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
