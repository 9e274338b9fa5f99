"""A synthetic city in the exact Cityscapes layout, for the tests, the demo and the benchmarks.

Every frame is a straight street seen from a car through a pinhole camera: road, sidewalks and
grass on the ground plane; facades with windows, walls, fences, hedges and trees beside it;
poles, signs, traffic lights, cars, trucks, buses, pedestrians and cyclists on it. The scene is
drawn as numbered polygons: one canvas gets the labelled outlines (the polygons JSON, and from
it labelIds/instanceIds/color), a second gets those plus same-class details (windows, lane
marks, wheels). The RGB image is rendered from the second with a colour, texture and shading
per part, so image and labels agree to the pixel and each class has a consistent look.
Sizes are in metres; anything thin is kept at least a few pixels wide *of a 256-wide frame*
(or left out), so a 256x128 city is learnable rather than a field of slivers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.labels import LABEL_BY_NAME, LABELS
from pipeline.shards import atomic_write_bytes

CITIES = {"train": ("aachen", "bremen", "hamburg", "zurich"),
          "val": ("frankfurt", "lindau", "munster")}
FRAME = 19  # the annotated frame of each real 30-frame snippet
_SPLIT_CODE = {"train": 0, "val": 1}

# Materials, and how much each varies the brightness of its colour at four scales:
# (grain, small blobs, leaf clusters, broad stains), in 256-wide-frame pixels 0.6, 1.5, 4, 30.
FLAT, SKY, ASPHALT, PAVING, GRASS, LEAVES, PLASTER, GLASS, BRICK, PLANKS, METAL, LAMP = range(12)
_TEX = np.array([
    [.015, .015, 0, .02],  # FLAT: paint, cloth, signs
    [0, 0, 0, 0],  # SKY: a gradient, clouds are added apart
    [.06, .04, 0, .06],  # ASPHALT
    [.03, .03, 0, .05],  # PAVING (+ joints)
    [.08, .10, .06, .05],  # GRASS
    [.06, .12, .40, .06],  # LEAVES
    [.015, .03, 0, .04],  # PLASTER
    [.01, .02, 0, .08],  # GLASS
    [.04, .05, 0, .03],  # BRICK (+ mortar)
    [.03, .08, 0, .03],  # PLANKS (+ gaps)
    [.015, .02, 0, .02],  # METAL
    [0, 0, 0, 0],  # LAMP: lit, flat
], np.float32)

# Palettes: realistic, but kept apart between classes (no white facades: white is for trucks;
# pedestrians and riders dress differently) so that a small model tells classes apart early.
_FACADES = [(214, 200, 172), (196, 178, 150), (222, 208, 160), (205, 195, 175), (215, 190, 160),
            (190, 180, 165), (225, 215, 185)]
_CARS = [(165, 168, 172), (70, 72, 76), (28, 28, 32), (32, 48, 100), (150, 28, 28),
         (40, 70, 55)]
_TOPS = [(120, 30, 45), (95, 50, 120), (30, 110, 115), (210, 95, 80), (150, 60, 110),
         (190, 190, 195)]
_TROUSERS = [(55, 75, 115), (30, 30, 35)]
_SPORT = [(235, 215, 20), (250, 130, 20), (150, 220, 40), (30, 190, 220)]
_SKIN = [(225, 185, 155), (200, 150, 115), (150, 100, 70), (95, 65, 45)]
_BIKES = [(30, 30, 30), (180, 30, 30), (30, 90, 170), (220, 220, 220), (40, 140, 60)]
_COLOR_LUT = np.zeros((256, 4), np.uint8)
for _lb in LABELS:
    if _lb.id >= 0:
        _COLOR_LUT[_lb.id] = (*_lb.color, 255)


def _circle(n: int = 14) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(a), np.sin(a)], 1)


def _clip(pts: np.ndarray, w: int, h: int) -> np.ndarray:
    """Sutherland-Hodgman clip of a polygon to the image rectangle [0, w] x [0, h]."""
    if pts.min() >= 0 and pts[:, 0].max() <= w and pts[:, 1].max() <= h:
        return pts
    for axis, bound, keep_low in ((0, 0, False), (0, w, True), (1, 0, False), (1, h, True)):
        if len(pts) == 0:
            break
        inside = (pts[:, axis] <= bound) if keep_low else (pts[:, axis] >= bound)
        if inside.all():
            continue
        out = []
        for i in range(len(pts)):
            a, b, ia, ib = pts[i - 1], pts[i], inside[i - 1], inside[i]
            if ia != ib:
                t = (bound - a[axis]) / (b[axis] - a[axis])
                out.append(a + t * (b - a))
            if ib:
                out.append(b)
        pts = np.array(out).reshape(-1, 2)
    return pts


class _Scene:
    """Camera, the two canvases and the table of parts drawn on them."""

    def __init__(self, size: tuple[int, int], rng: np.random.Generator) -> None:
        self.w, self.h = size
        self.rng = rng
        self.s = self.w / 256  # one pixel of a 256-wide frame
        self.f = 1.1 * self.w
        self.cx = self.w * (0.5 + rng.uniform(-0.06, 0.06))
        self.hy = self.h * rng.uniform(0.40, 0.46)
        self.cam = rng.uniform(1.3, 1.6)
        self.sun = rng.uniform(0.8, 1.1, 2)  # brightness of left- and right-side facades
        self.labels, self.parts = Image.new("I", size), Image.new("I", size)
        self.dl, self.dp = ImageDraw.Draw(self.labels), ImageDraw.Draw(self.parts)
        self.objects: list[dict] = []
        self.obj_ids: list[tuple[int, int]] = [(0, 0)]  # (labelId, instanceId) per outline
        # per part: colour, material, vertical gradient, cylinder shading, depth, bbox
        self.table: list[tuple] = [((0, 0, 0), FLAT, 0, 0, 0, 0, 0, 1, 1)]
        self.instances: dict[int, int] = {}
        self.sky_bottom = 0.0

    def project(self, x, y, z) -> np.ndarray:
        z = np.maximum(np.asarray(z, float), 0.3)  # nothing behind the camera
        u = self.cx + self.f * np.asarray(x, float) / z
        v = self.hy + self.f * (self.cam - np.asarray(y, float)) / z
        u, v = np.broadcast_arrays(u, v)
        return np.stack([u.ravel(), v.ravel()], 1)

    def sprite(self, x: float, z: float, uv) -> np.ndarray:
        """Points (u right, v up, metres) of an upright flat object standing at (x, z)."""
        base, k = self.project(x, 0, z)[0], self.f / z
        return base + k * np.asarray(uv, np.float64) * (1, -1)

    def instance(self, name: str) -> int:
        lid = LABEL_BY_NAME[name].id
        k = self.instances.get(lid, 0)
        self.instances[lid] = k + 1
        return lid * 1000 + k

    def poly(self, pts, name: str | None, color, mat: int = FLAT, *, inst: int | None = None,
             z: float = 0.0, grad: float = 0.0, cyl: float = 0.0) -> None:
        """Draw one part; `name` makes it a labelled outline, None a detail of the last one."""
        pts = _clip(np.asarray(pts, np.float64), self.w, self.h)
        if len(pts) < 3:
            return
        pts = np.round(pts).astype(int)
        flat = [tuple(p) for p in pts.tolist()]
        if name is not None:
            lid = LABEL_BY_NAME[name].id
            self.obj_ids.append((lid, lid if inst is None else inst))
            self.dl.polygon(flat, fill=len(self.obj_ids) - 1)
            self.objects.append({"label": name, "polygon": pts.tolist()})
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        self.table.append((color, mat, grad, cyl, z, x0, y0, x1 + 1, y1 + 1))
        self.dp.polygon(flat, fill=len(self.table) - 1)

    def jit(self, color, a: float = 0.08) -> tuple:
        c = np.asarray(color, float) * self.rng.uniform(1 - a, 1 + a) + self.rng.normal(0, 4, 3)
        return tuple(np.clip(c, 0, 255))


# ---------------------------------------------------------------------------------- objects


def _building(sc: _Scene, plane, a1: float, a2: float, height: float, color, z: float) -> None:
    """One building face with a grid of windows; plane(a, y) -> world (x, y, z), a along it."""
    rng = sc.rng
    a, y = np.array([a1, a1, a2, a2]), np.array([0, height, height, 0])
    sc.poly(sc.project(*plane(a, y)), "building", color, PLASTER, z=z)
    glass = sc.jit((55, 65, 78), 0.2)
    bay, floor, ww = rng.uniform(2.4, 3.4), rng.uniform(2.9, 3.4), rng.uniform(0.35, 0.55)
    shop = rng.random() < 0.5
    for ac in np.arange(a1 + bay / 2, a2 - bay / 3, bay):
        a = ac + bay * ww / 2 * np.array([-1, -1, 1, 1])
        for y0 in np.arange(1.0 if shop else floor * 0.35, height - floor * 0.7, floor):
            y1 = y0 + (2.4 if shop and y0 < 2 else floor * 0.5)
            win = sc.project(*plane(a, np.array([y0, y1, y1, y0])))
            if np.ptp(win[:, 0]) < 0.8:  # windows under a pixel wide only add aliasing
                break
            sc.poly(win, None, sc.jit(glass, 0.15), GLASS, grad=0.6, z=z)


def _facade(sc: _Scene, sg: int, xb: float, z1: float, z2: float, height: float) -> None:
    color = np.multiply(sc.jit(_FACADES[sc.rng.integers(len(_FACADES))]), sc.sun[int(sg > 0)])
    _building(sc, lambda a, y: (sg * xb, y, a), z1, z2, height, tuple(color), (z1 + z2) / 2)
    if z1 > 1.0:  # the end wall facing us, seen where the previous building is lower or absent
        _building(sc, lambda a, y: (sg * (xb + a), y, z1), 0, 15, height,
                  tuple(color * 0.72), z1)


def _bumpy_plane(sc: _Scene, sg: int, x: float, z1: float, z2: float, height: float, name: str,
                 color, mat: int, bump: float) -> None:
    """A vertical strip along the road (hedge, tree line, wall, fence) with a ragged top."""
    zs = np.linspace(z1, z2, max(2, int((z2 - z1) / 1.5)))
    top = height + bump * sc.rng.uniform(-1, 1, len(zs))
    pts = np.concatenate([sc.project(sg * x, top, zs), sc.project(sg * x, 0, zs[::-1])])
    sc.poly(pts, name, color, mat, z=(z1 + z2) / 2, grad=0.3)


def _tree(sc: _Scene, x: float, z: float, height: float, radius: float) -> None:
    rng = sc.rng
    trunk_w = max(0.35, 2.5 * sc.s * z / sc.f)
    sc.poly(sc.sprite(x, z, [(-trunk_w / 2, 0), (-trunk_w / 2, height), (trunk_w / 2, height),
                              (trunk_w / 2, 0)]),
            "vegetation", sc.jit((85, 70, 55)), PLASTER, z=z, cyl=0.5)
    green = sc.jit((70, 105, 40), 0.15)
    for _ in range(rng.integers(2, 4)):
        c = (rng.uniform(-0.5, 0.5) * radius, height + rng.uniform(0.2, 0.9) * radius)
        r = radius * rng.uniform(0.65, 1.0) * rng.uniform(0.8, 1.15, 14)[:, None]
        sc.poly(sc.sprite(x, z, c + r * _circle() * (1, 0.85)), "vegetation", green, LEAVES,
                z=z, grad=0.5)


def _pole(sc: _Scene, x: float, z: float, height: float, width: float) -> None:
    w = max(width, 3.5 * sc.s * z / sc.f)  # at least 3.5 pixels of a 256-wide frame
    sc.poly(sc.sprite(x, z, [(-w / 2, 0), (-w / 2, height), (w / 2, height), (w / 2, 0)]),
            "pole", sc.jit((120, 128, 140)), METAL, z=z, cyl=0.6)


def _sign(sc: _Scene, x: float, z: float) -> None:
    rng = sc.rng
    height, size = rng.uniform(2.2, 3.0), max(0.7, 9 * sc.s * z / sc.f)
    _pole(sc, x, z, height, 0.1)
    kind, c = rng.integers(4), np.array((0, height + size / 2))
    if kind == 0:  # round prohibition sign: red ring, white face
        sc.poly(sc.sprite(x, z, c + size / 2 * _circle(16)), "traffic sign", (200, 30, 35), z=z)
        sc.poly(sc.sprite(x, z, c + size * 0.36 * _circle(16)), None, (235, 235, 235), z=z)
    elif kind == 1:  # blue square
        sq = c + size / 2 * np.array([(-1, -1), (-1, 1), (1, 1), (1, -1)])
        sc.poly(sc.sprite(x, z, sq), "traffic sign", (30, 80, 175), z=z)
        sc.poly(sc.sprite(x, z, c + size * 0.25 * np.array([(-1, 0), (0, 1), (1, 0)])), None,
                (235, 235, 235), z=z)
    elif kind == 2:  # yellow priority diamond
        sc.poly(sc.sprite(x, z, c + size / 2 * np.array([(-1, 0), (0, 1), (1, 0), (0, -1)])),
                "traffic sign", (245, 195, 15), z=z)
    else:  # warning triangle
        tri = c + size / 2 * np.array([(-1, -0.8), (0, 1), (1, -0.8)])
        sc.poly(sc.sprite(x, z, tri), "traffic sign", (205, 30, 35), z=z)
        sc.poly(sc.sprite(x, z, c + size * 0.3 * np.array([(-1, -0.6), (0, 0.8), (1, -0.6)])),
                None, (235, 235, 235), z=z)


def _light(sc: _Scene, x: float, z: float) -> None:
    rng = sc.rng
    height = rng.uniform(2.4, 3.6)
    _pole(sc, x, z, height, 0.14)
    bw = max(0.4, 6 * sc.s * z / sc.f)
    bh = 2.6 * bw
    box = [(-bw / 2, height), (-bw / 2, height + bh), (bw / 2, height + bh), (bw / 2, height)]
    sc.poly(sc.sprite(x, z, box), "traffic light", (32, 33, 35), z=z, grad=0.3)
    lit = rng.integers(3)
    for i, col in enumerate([(240, 40, 30), (245, 180, 20), (40, 220, 90)]):
        on = col if i == lit else tuple(0.3 * np.array(col) + 20)
        c = (0, height + bh * (0.8 - 0.3 * i))
        sc.poly(sc.sprite(x, z, c + bw * 0.32 * _circle(10)), None, on, LAMP, z=z)


def _person(sc: _Scene, x: float, z: float, lean: float = 0.0) -> None:
    rng, rider = sc.rng, lean != 0
    name = "rider" if rider else "person"
    inst, h = sc.instance(name), rng.uniform(1.6, 1.9)
    shirt = sc.jit(_SPORT[rng.integers(len(_SPORT))] if rider else
                   _TOPS[rng.integers(len(_TOPS))])
    legs = sc.jit((30, 30, 35) if rider else _TROUSERS[rng.integers(len(_TROUSERS))])
    skin = sc.jit(_SKIN[rng.integers(4)])
    hip = 0.95 if rider else 0.5 * h
    stride = 0.25 if rider else rng.uniform(0, 0.22)
    top, b = hip + 0.32 * h, rng.uniform(0.95, 1.15)  # shoulders, build
    for sx in (-b, b):  # legs, then arms
        foot = (sx * (0.1 + stride), 0.3 if rider else 0)
        sc.poly(sc.sprite(x, z, [(sx * 0.02, hip), (sx * 0.19, hip), (foot[0] + sx * 0.08, foot[1]),
                                 (foot[0] - sx * 0.08, foot[1])]), name, legs, z=z, inst=inst)
    body = [(-0.19 * b, hip - 0.03), (-0.23 * b + lean, top), (0.23 * b + lean, top),
            (0.19 * b, hip - 0.03)]
    sc.poly(sc.sprite(x, z, body), name, shirt, z=z, inst=inst, grad=0.3)
    for sx in (-b, b):
        arm = [(sx * 0.17 + lean, top), (sx * 0.28 + lean, top - 0.02),
               (sx * 0.27 + lean * 1.6, hip + 0.02), (sx * 0.17 + lean * 1.6, hip + 0.04)]
        sc.poly(sc.sprite(x, z, arm), name, shirt, z=z, inst=inst)
    head, r = np.array((lean * 1.1, top + 0.09)), 0.115
    sc.poly(sc.sprite(x, z, head + r * _circle() * (0.85, 1)), name, skin, z=z, inst=inst)
    cap = (250, 250, 250) if rider else sc.jit((50, 35, 25), 0.3)  # helmet or hair
    sc.poly(sc.sprite(x, z, head + r * _circle()[:8] * (0.85, 1)), None, cap, z=z)


def _bicycle(sc: _Scene, x: float, z: float, ridden: bool) -> None:
    rng = sc.rng
    inst, d = sc.instance("bicycle"), rng.choice([-1, 1])
    frame, r = sc.jit(_BIKES[rng.integers(len(_BIKES))]), 0.34
    t = max(0.06, 2 * sc.s * z / sc.f) / 2  # tube half-thickness
    for u in (-0.52, 0.52):
        sc.poly(sc.sprite(x, z, (u, r) + r * _circle(16)), "bicycle", (22, 22, 24), z=z,
                inst=inst)
        sc.poly(sc.sprite(x, z, (u, r) + r * 0.78 * _circle(16)), None, (140, 140, 145), z=z)
    joints = np.array([(-0.52 * d, r), (-0.12 * d, 0.9), (0.0, 0.32), (0.42 * d, 0.92),
                       (0.52 * d, r), (0.36 * d, 1.05)])
    for a, b in ((0, 1), (1, 2), (0, 2), (2, 3), (1, 3), (3, 4), (3, 5)):
        p, q = joints[a], joints[b]
        n = np.array((q[1] - p[1], p[0] - q[0])) / np.hypot(*(q - p)) * t
        sc.poly(sc.sprite(x, z, [p + n, q + n, q - n, p - n]), "bicycle", frame, z=z, inst=inst)
    if ridden:
        _person(sc, x - 0.12 * d, z, lean=0.25 * d)


def _vehicle(sc: _Scene, kind: str, xc: float, z1: float, front: bool) -> None:
    """A car, truck or bus as a box: its end face and, if visible, its side face."""
    rng = sc.rng
    width, length, height = {"car": (rng.uniform(1.7, 1.9), rng.uniform(4.0, 4.8), 1.5),
                             "truck": (2.5, rng.uniform(7, 9), rng.uniform(3.2, 3.7)),
                             "bus": (2.55, 12.0, 3.1)}[kind]
    inst = sc.instance(kind)
    color = {"car": _CARS[rng.integers(len(_CARS))], "truck": (228, 228, 225),
             "bus": (230, 185, 40)}[kind]
    color = sc.jit(color, 0.06)
    glass, dark = (40, 48, 58), (20, 20, 22)
    xs = xc - np.sign(xc) * width / 2  # the side facing the camera's axis
    if abs(xc) > width / 2:
        shade = tuple(np.multiply(color, 0.8))
        if kind == "car":
            side = [(0, 0), (0, .9), (.24, .93), (.34, 1.5), (.78, 1.5), (.9, .95), (1, .9), (1, 0)]
            wins = [[(.3, .97), (.37, 1.42), (.76, 1.42), (.86, .97)]]
        elif kind == "bus":
            side = [(0, 0), (0, 3.1), (1, 3.1), (1, 0)]
            wins = [[(a + .01, 1.2), (a + .01, 2.6), (a + .09, 2.6), (a + .09, 1.2)]
                    for a in np.arange(0, 1, 0.1)]
        else:
            side = [(0, 0.4), (0, height), (.76, height), (.76, 0.4), (.79, 0.4), (.79, 2.9),
                    (.95, 2.9), (1, 2.2), (1, 0)]
            wins = [[(.82, 1.9), (.82, 2.7), (.95, 2.7), (.985, 1.9)]]
            wins = wins if not front else [[(1 - a, b) for a, b in wins[0]]]
            side = side if not front else [(1 - a, b) for a, b in side]
        t, v = np.array(side).T
        sc.poly(sc.project(xs, v, z1 + t * length), kind, shade, z=z1, grad=0.3, inst=inst)
        sc.poly(sc.project(xs, [0, 0.3, 0.3, 0], z1 + length * np.array([0, 0, 1, 1])), None,
                dark, z=z1)
        for w in wins:
            t, v = np.array(w).T
            sc.poly(sc.project(xs, v, z1 + t * length), None, glass, GLASS, z=z1, grad=0.5)
        r = 0.33 if kind == "car" else 0.5
        for t in (0.17, 0.83) if kind != "bus" else (0.15, 0.72):
            c = _circle(12) * r + (z1 + t * length, r)
            sc.poly(sc.project(xs, c[:, 1], c[:, 0]), None, dark, z=z1)
            sc.poly(sc.project(xs, c[:, 1] * .5 + r * .5, (c[:, 0] - c[:, 0].mean()) * .5 +
                               c[:, 0].mean()), None, (120, 120, 124), METAL, z=z1)
    u = np.array([-.5, -.5, -.4, .4, .5, .5]) if kind == "car" else np.array([-.5, -.5, .5, .5])
    v = [0, .9, height, height, .9, 0] if kind == "car" else [0, height, height, 0]
    sc.poly(sc.project(xc + u * width, v, z1), kind, color, z=z1, grad=0.4, inst=inst)

    def rect(u0, u1, v0, v1, col, mat=FLAT, grad=0.0):
        sc.poly(sc.project(xc + np.array([u0, u0, u1, u1]) * width, [v0, v1, v1, v0], z1),
                None, col, mat, z=z1, grad=grad)

    rect(-.5, .5, 0, .28, dark)
    top = {"car": (.96, 1.42, .36), "truck": (2.0, 2.9, .4), "bus": (1.3, 2.8, .45)}[kind]
    if kind != "truck" or front:
        rect(-top[2], top[2], top[0], top[1], glass, GLASS, 0.5)
    else:  # the cargo box's doors
        rect(-.01, .01, .5, height - .1, tuple(np.multiply(color, .7)))
    lamp = (245, 240, 210) if front else (200, 20, 20)
    for sx in (-1, 1):
        rect(sx * .44, sx * .32, .62, .76, lamp, LAMP)
    rect(-.13, .13, .34, .46, (225, 225, 220))  # number plate


def _static(sc: _Scene, x: float, z: float) -> None:
    rng = sc.rng
    kind = rng.integers(3)
    if kind == 0:  # litter bin
        pts, col = [(-.3, 0), (-.3, 1.0), (.3, 1.0), (.3, 0)], sc.jit((60, 75, 65), 0.2)
    elif kind == 1:  # advertising pillar
        pts, col = [(-.6, 0), (-.6, 2.8), (-.5, 3.0), (.5, 3.0), (.6, 2.8), (.6, 0)], (190, 90, 60)
    else:  # electrical cabinet
        pts, col = [(-.5, 0), (-.5, 1.3), (.5, 1.3), (.5, 0)], sc.jit((150, 155, 140))
    sc.poly(sc.sprite(x, z, pts), "static", col, PLASTER, z=z, cyl=0.4)


# ---------------------------------------------------------------------------------- the street


def _ground(sc: _Scene, x1: float, x2: float, z1: float, z2: float, name: str | None, color,
            mat: int) -> None:
    if name is not None:  # overlap the neighbours a little: no unlabelled seams between them
        x1, x2, z1, z2 = min(x1, x2) - 0.04, max(x1, x2) + 0.04, max(z1 - 0.05, 0.3), z2 + 0.05
    sc.poly(sc.project([x1, x2, x2, x1], 0, [z1, z1, z2, z2]), name, color, mat, z=-1)


def _side(sc: _Scene, sg: int, edge: float, zb: float, items: list) -> None:
    """Buildings and parks along one side (sg = +1 right, -1 left) beyond the sidewalk."""
    rng, z = sc.rng, 0.5
    grass = sc.jit((135, 160, 70), 0.08)

    def front(kind: str, z1: float, z2: float) -> None:  # along the back of the sidewalk
        name, color, mat, bump, low, high = {
            "wall": ("wall", (150, 78, 58), BRICK, 0, 1.2, 2.6),
            "fence": ("fence", (170, 135, 90), PLANKS, 0, 1.2, 2.0),
            "hedge": ("vegetation", (55, 95, 35), LEAVES, 0.25, 0.8, 1.6)}[kind]
        items.append((edge + 0.1, z1, _bumpy_plane, (sg, edge + 0.1, z1, z2,
                                                     rng.uniform(low, high), name, sc.jit(color),
                                                     mat, bump)))

    while z < zb:
        z2 = min(zb, z + rng.uniform(10, 32))
        if rng.random() < 0.65:
            setback = 0.0 if rng.random() < 0.45 else rng.uniform(1.0, 5.0)
            xb = edge + setback
            if setback:
                _ground(sc, sg * edge, sg * (xb + 0.5), z, z2, "terrain", grass, GRASS)
                front(rng.choice(["wall", "fence", "hedge"], p=[0.45, 0.3, 0.25]), z, z2)
            items.append((xb, z, _facade, (sg, xb, z, z2, rng.uniform(9, 26))))
        else:  # a park: grass, a tree line behind, trees, often a wall, fence or hedge in front
            _ground(sc, sg * edge, sg * 400, z, z2, "terrain", grass, GRASS)
            back = edge + rng.uniform(14, 30)
            items.append((back, z, _bumpy_plane, (sg, back, z, z2, rng.uniform(6, 12),
                                                  "vegetation", sc.jit((50, 85, 35)), LEAVES, 2)))
            for zt in np.arange(z + rng.uniform(2, 8), z2, rng.uniform(7, 12)):
                xt = edge + rng.uniform(3, 12)
                items.append((xt, zt, _tree, (sg * xt, zt, rng.uniform(2, 3.5),
                                              rng.uniform(2, 3.5))))
            kind = rng.choice(["wall", "fence", "hedge", ""], p=[0.25, 0.35, 0.2, 0.2])
            if kind:
                front(kind, z, z2)
        z = z2


def _backdrop(sc: _Scene, zb: float) -> None:
    """The far end of the street: a row of distant blocks and trees across the view."""
    rng, x = sc.rng, -260.0
    while x < 260:
        x2 = x + rng.uniform(12, 40)
        if rng.random() < 0.7:
            col = tuple(np.multiply(sc.jit(_FACADES[rng.integers(len(_FACADES))]), 0.9))
            _building(sc, lambda a, y: (a, y - 0.5, zb), x, x2, rng.uniform(6, 22), col, zb)
        else:
            xs = np.linspace(x, x2, 8)
            top = rng.uniform(6, 14) + rng.uniform(-2, 2, 8)
            pts = np.concatenate([sc.project(xs, top, zb), sc.project(xs[::-1], -0.5, zb)])
            sc.poly(pts, "vegetation", sc.jit((55, 85, 40)), LEAVES, z=zb, grad=0.3)
        x = x2


def _sidewalk(sc: _Scene, sg: int, kerb: float, zb: float, paving, items: list,
              street: list) -> None:
    """One side beyond the kerb: grass verge, sidewalk and what stands on it, then _side."""
    rng = sc.rng
    verge = rng.uniform(1.2, 2.5) if rng.random() < 0.35 else 0.0  # a grass strip
    edge, width = kerb + verge, rng.uniform(2.5, 5.0)
    # the sidewalk runs on under the facades: no seams where they meet
    _ground(sc, sg * edge, sg * (edge + width + 0.6), 0.5, zb, "sidewalk", paving, PAVING)
    if verge:
        _ground(sc, sg * kerb, sg * edge, 0.5, zb, "terrain", sc.jit((135, 160, 70), 0.08), GRASS)
    else:
        _ground(sc, sg * edge, sg * (edge + 0.25), 0.5, zb, None, (190, 190, 186), PAVING)
    _side(sc, sg, edge + width, zb, items)
    for zp in np.arange(rng.uniform(6, 20), 38, rng.uniform(18, 28)):  # street lamps
        street.append((zp, _pole, (sg * (kerb + 0.5), zp, rng.uniform(6, 9), 0.25)))
    for zs in rng.uniform(7, 28, rng.integers(0, 3)):
        street.append((zs, _sign, (sg * (kerb + 0.45), zs)))
    if rng.random() < (0.8 if verge else 0.4):
        for zt in np.arange(rng.uniform(7, 14), 45, rng.uniform(9, 14)):
            street.append((zt, _tree, (sg * (kerb + max(verge / 2, 1.0)), zt,
                                       rng.uniform(2.5, 3.5), rng.uniform(1.8, 3.0))))
    for zq in rng.uniform(6.5, 24, rng.poisson(2.5)):
        street.append((zq, _person, (sg * (edge + rng.uniform(0.5, width - 0.4)), zq)))
    for zq in rng.uniform(7, 20, rng.poisson(0.8)):  # parked bicycles
        street.append((zq, _bicycle, (sg * (edge + width - 0.5), zq, False)))
    for zq in rng.uniform(7, 35, rng.poisson(0.8)):  # bins, pillars, cabinets: 'static'
        street.append((zq, _static, (sg * (edge + rng.uniform(0.9, width - 0.5)), zq)))


def _build(sc: _Scene) -> None:
    rng = sc.rng
    zb = rng.uniform(90, 150)  # where the street ends in a row of distant blocks
    horizon = sc.sky_bottom = sc.project(0, 0, zb)[0, 1] + 1
    sc.poly([(0, 0), (sc.w, 0), (sc.w, horizon), (0, horizon)], "sky",
            sc.jit((140, 172, 212), 0.06), SKY, grad=-0.6)
    _backdrop(sc, zb)

    # the road: we drive in lane 0; lanes -n_left .. -n_left + oncoming - 1 come towards us
    lane = rng.uniform(3.0, 3.6)
    n_left, n_right = rng.integers(1, 4), rng.integers(0, 2)
    oncoming = rng.integers(1, n_left + 1)
    xl, xr = -lane / 2 - n_left * lane, lane / 2 + n_right * lane
    paving = sc.jit((178, 154, 144), 0.06)
    # ground under everything, so that no seam between two polygons is left unlabelled
    _ground(sc, -400, 400, 0.3, zb, "sidewalk", paving, PAVING)
    _ground(sc, xl, xr, 0.5, zb, "road", sc.jit((92, 92, 96), 0.1), ASPHALT)
    white = (225, 225, 218)
    for k in range(-n_left + 1, n_right + 1):  # lane boundaries; the centre line is solid
        b = (k - 0.5) * lane
        if k == oncoming - n_left:
            _ground(sc, b - 0.09, b + 0.09, 0.5, zb, None, white, FLAT)
            continue
        for zd in np.arange(rng.uniform(0, 9), 70, 9.0):
            _ground(sc, b - 0.07, b + 0.07, zd, zd + 3, None, white, FLAT)
    for b in (xl + 0.25, xr - 0.25):
        _ground(sc, b - 0.07, b + 0.07, 0.5, zb, None, white, FLAT)
    parking = rng.random() < 0.35
    if parking:
        _ground(sc, xr, xr + 2.3, 0.5, zb, "parking", sc.jit((110, 106, 104)), ASPHALT)

    items: list = []  # beside the street: (|x|, z, draw, args), drawn farther |x| first
    street: list = []  # on it: (z, draw, args), drawn far to near
    for sg, kerb in ((-1, -xl), (1, xr + 2.3 * parking)):
        _sidewalk(sc, sg, kerb, zb, paving, items, street)
        if (sg > 0 and parking) or rng.random() < 0.3:  # cars parked along the kerb
            for zp in np.arange(rng.uniform(3, 8), 70, rng.uniform(5.2, 7)):
                if rng.random() < 0.75:
                    street.append((zp, _vehicle, ("car", sg * (kerb - 1.2), zp, sg < 0)))
    if rng.random() < 0.6:  # a crossing with traffic lights and a zebra
        zi = rng.uniform(10, 20)
        street.append((zi, _light, (xr + 2.3 * parking + 0.4, zi)))
        street.append((zi, _light, (xl - 0.4, zi)))
        for xz in np.arange(xl + 0.5, xr - 0.6, 1.0):
            _ground(sc, xz, xz + 0.5, zi - 3.5, zi - 0.5, None, white, FLAT)
    for k in range(-n_left, n_right + 1):  # traffic
        zv = rng.uniform(14 if k == 0 else 5, 30)
        while zv < 90:
            kind = rng.choice(["car", "truck", "bus"], p=[0.8, 0.1, 0.1])
            if rng.random() < 0.6:
                street.append((zv, _vehicle, (kind, k * lane + rng.uniform(-.3, .3), zv,
                                              k < oncoming - n_left)))
            zv += rng.uniform(12, 30) + (8 if kind != "car" else 0)
    for zc in rng.uniform(8, 22, rng.poisson(0.8)):  # cyclists near the right kerb
        street.append((zc, _bicycle, (xr - 1.0, zc, True)))

    for _, _, draw, args in sorted(items, key=lambda t: (-t[0], -t[1])):
        draw(sc, *args)
    for _, draw, args in sorted(street, key=lambda t: -t[0]):
        draw(sc, *args)
    # our own bonnet, the 'ego vehicle' void class at the bottom of every real frame
    u = np.linspace(-1, 1, 33)
    top = sc.h * (rng.uniform(0.86, 0.89) + 0.07 * u**2)
    hood = np.concatenate([np.stack([(u + 1) / 2 * sc.w, top], 1), [(sc.w, sc.h), (0, sc.h)]])
    sc.poly(hood, "ego vehicle", (38, 42, 48), z=0, grad=0.8)


# ---------------------------------------------------------------------------------- rendering


def _smooth(rng: np.random.Generator, h: int, w: int, cell: float, aspect: float = 1.0):
    """Zero-mean, unit-ish noise with features about `cell` pixels across."""
    if cell < 1.2:
        return rng.standard_normal((h, w), np.float32)
    gw, gh = int(w / (cell * aspect)) + 2, int(h / cell) + 2
    grid = Image.fromarray(rng.standard_normal((gh, gw), np.float32))
    return np.asarray(grid.resize((w, h), Image.BILINEAR)) * 1.6


def _haze(z: np.ndarray) -> np.ndarray:
    return 0.35 * (1 - np.exp(-np.maximum(z, 0) / 140))


def _render(sc: _Scene) -> np.ndarray:
    rng, h, w, s = sc.rng, sc.h, sc.w, sc.s
    part = np.asarray(sc.parts, np.int32)
    cols = list(zip(*sc.table))
    color, mat = np.array(cols[0], np.float32), np.array(cols[1])
    grad, cyl, depth, x0, y0, x1, y1 = (np.array(c, np.float32) for c in cols[2:])
    m = mat[part]
    ys = np.arange(h, dtype=np.float32)[:, None]
    # brightness ramps down each part's box (lit tops, a sky paler at the horizon) ...
    slope = grad / (y1 - y0)
    shade = (1 + 0.5 * grad + slope * y0)[part] - slope[part] * ys
    yy, xx = np.nonzero(cyl[part] > 0)  # ... and round things darken towards their sides
    p = part[yy, xx]
    shade[yy, xx] *= 1 - cyl[p] * ((xx - x0[p]) / (x1 - x0)[p] * 2 - 1) ** 2
    tex = np.ones((h, w), np.float32)
    for i, cell in ((0, 0.6), (1, 1.5), (2, 4.0), (3, 30.0)):  # grain, blobs, leaves, stains
        tex += _TEX[m, i] * _smooth(rng, h, w, cell * s)
    np.clip(tex, 0.25, 2.0, out=tex)
    zrow = sc.f * sc.cam / np.maximum(ys + 0.5 - sc.hy, 0.5)  # depth of the ground, per row
    yy, xx = np.nonzero(m == PAVING)  # paving stones, laid in ground-plane metres
    zg = zrow[yy, 0]
    xg = (xx + 0.5 - sc.cx) * zg / sc.f
    joint = (np.mod(xg / 0.45, 1) < 0.07) | (np.mod(zg / 0.45, 1) < 0.07)
    tex[yy, xx] *= 1 - 0.22 * joint * np.clip(sc.f / zg * 0.03, 0, 1)  # fade sub-pixel joints
    yy, xx = np.nonzero(m == BRICK)  # bricks and planks in image pixels: cheap, reads fine
    row = np.floor(yy / (2.4 * s))
    u = (xx + (row % 2) * 2.6 * s) / (5.2 * s)
    var = ((row * 7919 + np.floor(u) * 104729) % 97) / 97 - 0.5
    mortar = (np.mod(yy / (2.4 * s), 1) < 0.2) | (np.mod(u, 1) < 0.1)
    tex[yy, xx] *= np.where(mortar, 0.75, 1 + 0.16 * var)
    yy, xx = np.nonzero(m == PLANKS)
    u = xx / (3 * s)
    tex[yy, xx] *= np.where(np.mod(u, 1) < 0.16, 0.55, 0.9 + 0.2 * (np.floor(u) * 7919 % 31 / 31))
    # haze grows with distance: per part, per row on the ground
    haze = np.where(depth[part] < 0, _haze(zrow), _haze(depth)[part])
    shade *= tex
    shade *= 1 - haze
    img = color[part] * shade[..., None] + np.array([188, 198, 210], np.float32) * haze[..., None]
    top = min(h, int(sc.sky_bottom) + 1)  # clouds: pale streaks over the sky
    sky = m[:top] == SKY
    cover = np.clip((_smooth(rng, top, w, 25 * s, aspect=3.0) - rng.uniform(0.2, 1.5)) * 0.7,
                    0, 0.85)
    img[:top][sky] += (240 - img[:top][sky]) * cover[sky][:, None]
    # sensor noise; with the textures it makes 2048x1024 PNGs of ~2.5 MB, like the real ones
    img += rng.standard_normal(img.shape, np.float32) * 0.5
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------- the files


def _png(array: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def render_frame(size: tuple[int, int], rng: np.random.Generator):
    """One scene in memory: (RGB HxWx3 uint8, labelIds uint8, instanceIds uint16, polygons)."""
    sc = _Scene(size, rng)
    _build(sc)
    ids = np.array(sc.obj_ids)
    outline = np.asarray(sc.labels, np.int32)
    label_ids, inst = ids[outline, 0].astype(np.uint8), ids[outline, 1].astype(np.uint16)
    polygons = {"imgHeight": sc.h, "imgWidth": sc.w, "objects": sc.objects}
    return _render(sc), label_ids, inst, polygons


def synthesize(root: Path, *, train: int = 20, val: int = 10,
               size: tuple[int, int] = (2048, 1024), seed: int = 0,
               progress: bool = False) -> list[Path]:
    """Write a synthetic Cityscapes tree (leftImg8bit + gtFine) under `root`; returns images."""
    w, h = (int(v) for v in size)
    if w < 32 or h < 16:
        raise ValueError(f"synthetic city: size {w}x{h} is too small (at least 32x16)")
    if train < 0 or val < 0 or seed < 0:
        raise ValueError("synthetic city: --train, --val and --seed must not be negative")
    root = Path(root)
    jobs = [(split, i) for split, n in (("train", train), ("val", val)) for i in range(n)]
    paths = []
    for split, i in tqdm(jobs, desc="synth", unit="frame", disable=not progress):
        cities = CITIES[split]
        city, seq = cities[i % len(cities)], i // len(cities)
        stem = f"{city}_{seq:06d}_{FRAME:06d}"
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        rgb, label_ids, inst, polygons = render_frame((w, h), rng)
        img_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        gt = gt_dir / f"{stem}_gtFine"
        atomic_write_bytes(Path(f"{gt}_labelIds.png"), _png(label_ids, 6))
        atomic_write_bytes(Path(f"{gt}_color.png"), _png(_COLOR_LUT[label_ids], 6))
        atomic_write_bytes(Path(f"{gt}_instanceIds.png"), _png(inst, 6))
        atomic_write_bytes(Path(f"{gt}_polygons.json"),
                           json.dumps(polygons, indent=1).encode())
        path = img_dir / f"{stem}_leftImg8bit.png"
        atomic_write_bytes(path, _png(rgb, 1))
        paths.append(path)
    return paths
