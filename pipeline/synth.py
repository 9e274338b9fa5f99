"""A synthetic city in the exact Cityscapes layout, for the tests, the demo and the benchmarks.

Every frame is a straight street seen from a car through a pinhole camera: road, sidewalks and
grass on the ground plane; facades with windows, walls, fences, hedges and trees beside it;
poles, signs, traffic lights, cars, trucks, buses, pedestrians and cyclists on it. This module
lays the street out and places those things, drawn as numbered polygons on a pipeline.scene
Scene; renders the RGB image from its canvas of parts with a colour, texture and shading per
part, so image and labels agree to the pixel and each class has a consistent look; and writes
the leftImg8bit + gtFine tree (labelIds, instanceIds, color, polygons JSON). A test split,
as on the benchmark server, has images only.

With `coarse`, gtCoarse labels as well, and `extra` frames of a train_extra split that, as in
Cityscapes, have only those: the fine labelIds with a band along every boundary between two
labels set to 0 (unlabeled), which is how the real coarse polygons look next to the fine ones
(drawn inside the objects, leaving their edges out). No coarse polygons JSON is written: these
labels are derived from pixels, not drawn.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipeline import scene
from pipeline.files import atomic_write_bytes
from pipeline.labels import LABELS
from pipeline.progress import bar as progress_bar
from pipeline.scene import ASPHALT, BRICK, FACADES, FLAT, GRASS, LEAVES, PAVING, PLANKS, SKY

CITIES = {"train": ("aachen", "bremen", "hamburg", "zurich"),
          "val": ("frankfurt", "lindau", "munster"),
          "train_extra": ("augsburg", "bamberg", "dortmund", "konstanz"),
          "test": ("berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich")}
FRAME = 19  # the annotated frame of each real 30-frame snippet
_SPLIT_CODE = {"train": 0, "val": 1, "train_extra": 2, "test": 3}

# How much each material (pipeline.scene) varies the brightness of its colour at four scales:
# (grain, small blobs, leaf clusters, broad stains), in 256-wide-frame pixels 0.6, 1.5, 4, 30.
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
_COLOR_LUT = np.zeros((256, 4), np.uint8)
for _lb in LABELS:
    if _lb.id >= 0:
        _COLOR_LUT[_lb.id] = (*_lb.color, 255)


# ---------------------------------------------------------------------------------- the street


def _ground(sc: scene.Scene, x1: float, x2: float, z1: float, z2: float, name: str | None, color,
            mat: int) -> None:
    if name is not None:  # overlap the neighbours a little: no unlabelled seams between them
        x1, x2, z1, z2 = min(x1, x2) - 0.04, max(x1, x2) + 0.04, max(z1 - 0.05, 0.3), z2 + 0.05
    sc.poly(sc.project([x1, x2, x2, x1], 0, [z1, z1, z2, z2]), name, color, mat, z=-1)


def _side(sc: scene.Scene, sg: int, edge: float, zb: float, items: list) -> None:
    """Buildings and parks along one side (sg = +1 right, -1 left) beyond the sidewalk."""
    rng, z = sc.rng, 0.5
    grass = sc.jit((135, 160, 70), 0.08)

    def front(kind: str, z1: float, z2: float) -> None:  # along the back of the sidewalk
        name, color, mat, bump, low, high = {
            "wall": ("wall", (150, 78, 58), BRICK, 0, 1.2, 2.6),
            "fence": ("fence", (170, 135, 90), PLANKS, 0, 1.2, 2.0),
            "hedge": ("vegetation", (55, 95, 35), LEAVES, 0.25, 0.8, 1.6)}[kind]
        args = (sg, edge + 0.1, z1, z2, rng.uniform(low, high), name, sc.jit(color), mat, bump)
        items.append((edge + 0.1, z1, scene.bumpy_plane, args))

    while z < zb:
        z2 = min(zb, z + rng.uniform(10, 32))
        if rng.random() < 0.65:
            setback = 0.0 if rng.random() < 0.45 else rng.uniform(1.0, 5.0)
            xb = edge + setback
            if setback:
                _ground(sc, sg * edge, sg * (xb + 0.5), z, z2, "terrain", grass, GRASS)
                front(rng.choice(["wall", "fence", "hedge"], p=[0.45, 0.3, 0.25]), z, z2)
            items.append((xb, z, scene.facade, (sg, xb, z, z2, rng.uniform(9, 26))))
        else:  # a park: grass, a tree line behind, trees, often a wall, fence or hedge in front
            _ground(sc, sg * edge, sg * 400, z, z2, "terrain", grass, GRASS)
            back = edge + rng.uniform(14, 30)
            args = (sg, back, z, z2, rng.uniform(6, 12), "vegetation", sc.jit((50, 85, 35)),
                    LEAVES, 2)
            items.append((back, z, scene.bumpy_plane, args))
            for zt in np.arange(z + rng.uniform(2, 8), z2, rng.uniform(7, 12)):
                xt = edge + rng.uniform(3, 12)
                items.append((xt, zt, scene.tree, (sg * xt, zt, rng.uniform(2, 3.5),
                                                   rng.uniform(2, 3.5))))
            kind = rng.choice(["wall", "fence", "hedge", ""], p=[0.25, 0.35, 0.2, 0.2])
            if kind:
                front(kind, z, z2)
        z = z2


def _backdrop(sc: scene.Scene, zb: float) -> None:
    """The far end of the street: a row of distant blocks and trees across the view."""
    rng, x = sc.rng, -260.0
    while x < 260:
        x2 = x + rng.uniform(12, 40)
        if rng.random() < 0.7:
            col = tuple(np.multiply(sc.jit(FACADES[rng.integers(len(FACADES))]), 0.9))
            scene.building(sc, lambda a, y: (a, y - 0.5, zb), x, x2, rng.uniform(6, 22), col, zb)
        else:
            xs = np.linspace(x, x2, 8)
            top = rng.uniform(6, 14) + rng.uniform(-2, 2, 8)
            pts = np.concatenate([sc.project(xs, top, zb), sc.project(xs[::-1], -0.5, zb)])
            sc.poly(pts, "vegetation", sc.jit((55, 85, 40)), LEAVES, z=zb, grad=0.3)
        x = x2


def _sidewalk(sc: scene.Scene, sg: int, kerb: float, zb: float, paving, items: list,
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
        street.append((zp, scene.pole, (sg * (kerb + 0.5), zp, rng.uniform(6, 9), 0.25)))
    for zs in rng.uniform(7, 28, rng.integers(0, 3)):
        street.append((zs, scene.traffic_sign, (sg * (kerb + 0.45), zs)))
    if rng.random() < (0.8 if verge else 0.4):
        for zt in np.arange(rng.uniform(7, 14), 45, rng.uniform(9, 14)):
            street.append((zt, scene.tree, (sg * (kerb + max(verge / 2, 1.0)), zt,
                                            rng.uniform(2.5, 3.5), rng.uniform(1.8, 3.0))))
    for zq in rng.uniform(6.5, 24, rng.poisson(2.5)):
        street.append((zq, scene.person, (sg * (edge + rng.uniform(0.5, width - 0.4)), zq)))
    for zq in rng.uniform(7, 20, rng.poisson(0.8)):  # parked bicycles
        street.append((zq, scene.bicycle, (sg * (edge + width - 0.5), zq, False)))
    for zq in rng.uniform(7, 35, rng.poisson(0.8)):  # bins, pillars, cabinets: 'static'
        street.append((zq, scene.static, (sg * (edge + rng.uniform(0.9, width - 0.5)), zq)))


def _build(sc: scene.Scene) -> None:
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
                    street.append((zp, scene.vehicle, ("car", sg * (kerb - 1.2), zp, sg < 0)))
    if rng.random() < 0.6:  # a crossing with traffic lights and a zebra
        zi = rng.uniform(10, 20)
        street.append((zi, scene.traffic_light, (xr + 2.3 * parking + 0.4, zi)))
        street.append((zi, scene.traffic_light, (xl - 0.4, zi)))
        for xz in np.arange(xl + 0.5, xr - 0.6, 1.0):
            _ground(sc, xz, xz + 0.5, zi - 3.5, zi - 0.5, None, white, FLAT)
    for k in range(-n_left, n_right + 1):  # traffic
        zv = rng.uniform(14 if k == 0 else 5, 30)
        while zv < 90:
            kind = rng.choice(["car", "truck", "bus"], p=[0.8, 0.1, 0.1])
            if rng.random() < 0.6:
                street.append((zv, scene.vehicle, (kind, k * lane + rng.uniform(-.3, .3), zv,
                                                   k < oncoming - n_left)))
            zv += rng.uniform(12, 30) + (8 if kind != "car" else 0)
    for zc in rng.uniform(8, 22, rng.poisson(0.8)):  # cyclists near the right kerb
        street.append((zc, scene.bicycle, (xr - 1.0, zc, True)))

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


def _render(sc: scene.Scene) -> np.ndarray:
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
    """One scene of `size` (H, W) in memory: (RGB HxWx3 uint8, labelIds uint8, instanceIds
    uint16, polygons)."""
    sc = scene.Scene(size, rng)
    _build(sc)
    ids = np.array(sc.obj_ids)
    outline = np.asarray(sc.labels, np.int32)
    label_ids, inst = ids[outline, 0].astype(np.uint8), ids[outline, 1].astype(np.uint16)
    polygons = {"imgHeight": sc.h, "imgWidth": sc.w, "objects": sc.objects}
    return _render(sc), label_ids, inst, polygons


def coarse_label_ids(label_ids: np.ndarray, margin: int) -> np.ndarray:
    """Fine labelIds as a coarse annotation: pixels within `margin` of a boundary between two
    labels become 0 (unlabeled)."""
    ids = np.asarray(label_ids)
    edge = np.zeros(ids.shape, bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[:, :-1] |= ids[:, 1:] != ids[:, :-1]
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:-1] |= ids[1:] != ids[:-1]
    if margin > 1:
        band = Image.fromarray(edge.astype(np.uint8) * 255).filter(
            ImageFilter.MaxFilter(2 * margin - 1))
        edge = np.asarray(band) > 0
    return np.where(edge, 0, ids).astype(np.uint8)


def synthesize(root: Path, *, train: int = 20, val: int = 10, test: int = 0,
               size: tuple[int, int] = (1024, 2048), seed: int = 0, coarse: bool = False,
               extra: int = 0, progress: bool = False) -> list[Path]:
    """Write a synthetic Cityscapes tree (leftImg8bit + gtFine) of frames of `size` (H, W)
    under `root`; returns the images.

    `coarse` adds gtCoarse labels to train and val; `extra` frames of train_extra come with
    gtCoarse only (and imply `coarse`). `test` frames get no label files at all: the public
    test split has no usable labels, and code meant for it (`citytrain evaluate --submit`)
    must not need any. Without these the output is what it always was.
    """
    h, w = (int(v) for v in size)
    if w < 32 or h < 16:
        raise ValueError(f"synthetic city: size {w}x{h} is too small (at least 32x16)")
    if min(train, val, test, extra, seed) < 0:
        raise ValueError("synthetic city: --train, --val, --test, --extra and --seed must not "
                         "be negative")
    coarse = coarse or extra > 0
    margin = max(1, round(w / 256))  # 8 pixels at 2048x1024
    root = Path(root)
    jobs = [(split, i) for split, n in (("train", train), ("val", val), ("train_extra", extra),
                                        ("test", test))
            for i in range(n)]
    paths = []
    for split, i in progress_bar(jobs, desc="synth", unit="frame", disable=not progress):
        cities = CITIES[split]
        city, seq = cities[i % len(cities)], i // len(cities)
        stem = f"{city}_{seq:06d}_{FRAME:06d}"
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        rgb, label_ids, inst, polygons = render_frame((h, w), rng)
        if split not in ("train_extra", "test"):  # Cityscapes has no fine labels for them
            gt = root / "gtFine" / split / city / f"{stem}_gtFine"
            gt.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(f"{gt}_labelIds.png"), _png(label_ids, 6))
            atomic_write_bytes(Path(f"{gt}_color.png"), _png(_COLOR_LUT[label_ids], 6))
            atomic_write_bytes(Path(f"{gt}_instanceIds.png"), _png(inst, 6))
            atomic_write_bytes(Path(f"{gt}_polygons.json"),
                               json.dumps(polygons, indent=1).encode())
        if coarse and split != "test":
            ids = coarse_label_ids(label_ids, margin)
            gt = root / "gtCoarse" / split / city / f"{stem}_gtCoarse"
            gt.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(f"{gt}_labelIds.png"), _png(ids, 6))
            atomic_write_bytes(Path(f"{gt}_color.png"), _png(_COLOR_LUT[ids], 6))
            atomic_write_bytes(Path(f"{gt}_instanceIds.png"),
                               _png(np.where(ids == 0, 0, inst).astype(np.uint16), 6))
        img_dir = root / "leftImg8bit" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        path = img_dir / f"{stem}_leftImg8bit.png"
        atomic_write_bytes(path, _png(rgb, 1))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------- a drive

SEQUENCE_CITY = "stuttgart_00"  # as the first sequence of leftImg8bit_demoVideo.zip
ZOOM = 1.3  # how much nearer the last frame is than the first


def synthesize_sequence(root: Path, *, frames: int = 30, size: tuple[int, int] = (1024, 2048),
                        seed: int = 0, progress: bool = False) -> list[Path]:
    """`frames` consecutive frames of one drive in the demoVideo layout under `root`:
    leftImg8bit/demoVideo/stuttgart_00/stuttgart_00_000000_{k:06d}_leftImg8bit.png, k from 1.

    One street is rendered once at 1.3x the size and the camera moves towards its vanishing
    point by zooming in around it, frame by frame: cheap, smooth, and a video of it reads as a
    drive (as demoVideo, no labels). Returns the images in frame order.
    """
    h, w = (int(v) for v in size)
    if w < 32 or h < 16:
        raise ValueError(f"synthetic sequence: size {w}x{h} is too small (at least 32x16)")
    if frames < 1 or seed < 0:
        raise ValueError("synthetic sequence: --sequence must be positive, --seed not negative")
    sc = scene.Scene((math.ceil(h * ZOOM), math.ceil(w * ZOOM)), np.random.default_rng([seed, 9]))
    _build(sc)
    street = Image.fromarray(_render(sc))
    folder = Path(root) / "leftImg8bit" / "demoVideo" / SEQUENCE_CITY
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in progress_bar(range(frames), desc="sequence", unit="frame", disable=not progress):
        zoom = 1 + (ZOOM - 1) * k / max(frames - 1, 1)
        # the box keeps the vanishing point (cx, hy) where it is in the frame
        box = (sc.cx * (1 - 1 / zoom), sc.hy * (1 - 1 / zoom),
               sc.cx * (1 - 1 / zoom) + sc.w / zoom, sc.hy * (1 - 1 / zoom) + sc.h / zoom)
        frame = street.resize((w, h), Image.BICUBIC, box=box)
        path = folder / f"{SEQUENCE_CITY}_000000_{k + 1:06d}_leftImg8bit.png"
        atomic_write_bytes(path, _png(np.asarray(frame), 1))
        paths.append(path)
    return paths
