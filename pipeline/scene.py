"""The scene a synthetic frame is drawn on (pipeline.synth), and the things that stand in it.

`Scene` is a pinhole camera over a street, sizes in metres, and two canvases of numbered
polygons: one gets the labelled outlines (the polygons JSON, and from it labelIds/instanceIds),
the other those plus same-class details (windows, lane marks, wheels), each part with a colour,
material and shading to render the photo from. The drawers below each add one building, tree,
pole, sign, traffic light, person, bicycle, vehicle or 'static' object. Anything thin is kept at
least a few pixels wide *of a 256-wide frame* (or left out), so a 256x128 city is learnable
rather than a field of slivers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline import sizes
from pipeline.labels import LABEL_BY_NAME

# What each part is made of; pipeline.synth gives each material its texture.
FLAT, SKY, ASPHALT, PAVING, GRASS, LEAVES, PLASTER, GLASS, BRICK, PLANKS, METAL, LAMP = range(12)

# Palettes: realistic, but kept apart between classes (no white facades: white is for trucks;
# pedestrians and riders dress differently) so that a small model tells classes apart early.
FACADES = [(214, 200, 172), (196, 178, 150), (222, 208, 160), (205, 195, 175), (215, 190, 160),
           (190, 180, 165), (225, 215, 185)]
_CARS = [(165, 168, 172), (70, 72, 76), (28, 28, 32), (32, 48, 100), (150, 28, 28), (40, 70, 55)]
_TOPS = [(120, 30, 45), (95, 50, 120), (30, 110, 115), (210, 95, 80), (150, 60, 110),
         (190, 190, 195)]
_TROUSERS = [(55, 75, 115), (30, 30, 35)]
_SPORT = [(235, 215, 20), (250, 130, 20), (150, 220, 40), (30, 190, 220)]
_SKIN = [(225, 185, 155), (200, 150, 115), (150, 100, 70), (95, 65, 45)]
_BIKES = [(30, 30, 30), (180, 30, 30), (30, 90, 170), (220, 220, 220), (40, 140, 60)]


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


class Scene:
    """Camera, the two canvases and the table of parts drawn on them."""

    def __init__(self, size: tuple[int, int], rng: np.random.Generator) -> None:
        self.h, self.w = size
        self.rng = rng
        self.s = self.w / 256  # one pixel of a 256-wide frame
        self.f = 1.1 * self.w
        self.cx = self.w * (0.5 + rng.uniform(-0.06, 0.06))
        self.hy = self.h * rng.uniform(0.40, 0.46)
        self.cam = rng.uniform(1.3, 1.6)
        self.sun = rng.uniform(0.8, 1.1, 2)  # brightness of left- and right-side facades
        self.labels, self.parts = (Image.new("I", sizes.wh(size)) for _ in range(2))
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


def building(sc: Scene, plane, a1: float, a2: float, height: float, color, z: float) -> None:
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


def facade(sc: Scene, sg: int, xb: float, z1: float, z2: float, height: float) -> None:
    color = np.multiply(sc.jit(FACADES[sc.rng.integers(len(FACADES))]), sc.sun[int(sg > 0)])
    building(sc, lambda a, y: (sg * xb, y, a), z1, z2, height, tuple(color), (z1 + z2) / 2)
    if z1 > 1.0:  # the end wall facing us, seen where the previous building is lower or absent
        building(sc, lambda a, y: (sg * (xb + a), y, z1), 0, 15, height,
                 tuple(color * 0.72), z1)


def bumpy_plane(sc: Scene, sg: int, x: float, z1: float, z2: float, height: float, name: str,
                color, mat: int, bump: float) -> None:
    """A vertical strip along the road (hedge, tree line, wall, fence) with a ragged top."""
    zs = np.linspace(z1, z2, max(2, int((z2 - z1) / 1.5)))
    top = height + bump * sc.rng.uniform(-1, 1, len(zs))
    pts = np.concatenate([sc.project(sg * x, top, zs), sc.project(sg * x, 0, zs[::-1])])
    sc.poly(pts, name, color, mat, z=(z1 + z2) / 2, grad=0.3)


def tree(sc: Scene, x: float, z: float, height: float, radius: float) -> None:
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


def pole(sc: Scene, x: float, z: float, height: float, width: float) -> None:
    w = max(width, 3.5 * sc.s * z / sc.f)  # at least 3.5 pixels of a 256-wide frame
    sc.poly(sc.sprite(x, z, [(-w / 2, 0), (-w / 2, height), (w / 2, height), (w / 2, 0)]),
            "pole", sc.jit((120, 128, 140)), METAL, z=z, cyl=0.6)


def traffic_sign(sc: Scene, x: float, z: float) -> None:
    rng = sc.rng
    height, size = rng.uniform(2.2, 3.0), max(0.7, 9 * sc.s * z / sc.f)
    pole(sc, x, z, height, 0.1)
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


def traffic_light(sc: Scene, x: float, z: float) -> None:
    rng = sc.rng
    height = rng.uniform(2.4, 3.6)
    pole(sc, x, z, height, 0.14)
    bw = max(0.4, 6 * sc.s * z / sc.f)
    bh = 2.6 * bw
    box = [(-bw / 2, height), (-bw / 2, height + bh), (bw / 2, height + bh), (bw / 2, height)]
    sc.poly(sc.sprite(x, z, box), "traffic light", (32, 33, 35), z=z, grad=0.3)
    lit = rng.integers(3)
    for i, col in enumerate([(240, 40, 30), (245, 180, 20), (40, 220, 90)]):
        on = col if i == lit else tuple(0.3 * np.array(col) + 20)
        c = (0, height + bh * (0.8 - 0.3 * i))
        sc.poly(sc.sprite(x, z, c + bw * 0.32 * _circle(10)), None, on, LAMP, z=z)


def person(sc: Scene, x: float, z: float, lean: float = 0.0) -> None:
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


def bicycle(sc: Scene, x: float, z: float, ridden: bool) -> None:
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
        person(sc, x - 0.12 * d, z, lean=0.25 * d)


def vehicle(sc: Scene, kind: str, xc: float, z1: float, front: bool) -> None:
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


def static(sc: Scene, x: float, z: float) -> None:
    rng = sc.rng
    kind = rng.integers(3)
    if kind == 0:  # litter bin
        pts, col = [(-.3, 0), (-.3, 1.0), (.3, 1.0), (.3, 0)], sc.jit((60, 75, 65), 0.2)
    elif kind == 1:  # advertising pillar
        pts, col = [(-.6, 0), (-.6, 2.8), (-.5, 3.0), (.5, 3.0), (.6, 2.8), (.6, 0)], (190, 90, 60)
    else:  # electrical cabinet
        pts, col = [(-.5, 0), (-.5, 1.3), (.5, 1.3), (.5, 0)], sc.jit((150, 155, 140))
    sc.poly(sc.sprite(x, z, pts), "static", col, PLASTER, z=z, cyl=0.4)
