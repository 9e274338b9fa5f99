"""The evaluation's pictures: the confusion matrix and the per-class IoU, as PNGs beside
metrics.json and as TensorBoard images at each validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from train.visualize import as_numpy, write_png

# A white-to-blue ramp (as matplotlib's "Blues"): light cells recede, large shares stand out.
_RAMP = np.array([(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181),
                  (8, 48, 107)], np.float64)
_INK, _GRID, _ABSENT = (30, 30, 30), (200, 200, 200), (236, 236, 236)


def _font(size: int):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 ships a scalable font; older ones only a tiny bitmap one
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def ramp_color(value: float) -> tuple[int, int, int]:
    """The colour of a share in [0, 1] on the white-to-blue scale."""
    pos = min(max(value, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(pos), len(_RAMP) - 2)
    c = _RAMP[i] + (pos - i) * (_RAMP[i + 1] - _RAMP[i])
    return int(round(c[0])), int(round(c[1])), int(round(c[2]))


def _text_width(draw, text: str, font) -> int:
    return int(draw.textlength(text, font=font))


def _vertical_text(canvas: Image.Image, xy: tuple[int, int], text: str, font,
                   fill=_INK) -> None:
    """Text reading bottom to top, its top-left corner at `xy` (bottom of the text at y+w)."""
    from PIL import ImageDraw

    w = _text_width(ImageDraw.Draw(canvas), text, font) + 2
    h = font.size + 6 if hasattr(font, "size") else 14
    strip = Image.new("L", (w, h), 0)
    ImageDraw.Draw(strip).text((1, 1), text, fill=255, font=font)
    strip = strip.rotate(90, expand=True)
    canvas.paste(Image.new("RGB", strip.size, fill), xy, strip)


def confusion_image(matrix, classes: list[str], title: str = "") -> np.ndarray:
    """RGB picture of a confusion matrix (rows ground truth, columns prediction), each row
    normalized to the share of its ground-truth pixels, values in percent in the cells.
    Rows of classes absent from the ground truth are grey."""
    from PIL import ImageDraw

    mat = np.asarray(as_numpy(matrix), dtype=np.float64)
    k = len(classes)
    if mat.shape != (k, k):
        raise ValueError(f"a {mat.shape} matrix for {k} classes")
    rows = mat.sum(1, keepdims=True)
    share = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max(_text_width(probe, c, font) for c in classes) + 10
    cell = 34
    left, top = name_w + 24, name_w + 44
    bar_x = left + k * cell + 24
    width, height = bar_x + 70, top + k * cell + 16
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title or "confusion matrix: share of each ground-truth class's pixels "
              "(%)", fill=_INK, font=font)
    draw.text((left + (k * cell - _text_width(draw, "prediction", font)) // 2, 26),
              "prediction", fill=_INK, font=font)
    _vertical_text(img, (4, top + (k * cell - _text_width(draw, "ground truth", font)) // 2),
                   "ground truth", font)
    for i, name in enumerate(classes):
        y = top + i * cell
        draw.text((left - 6 - _text_width(draw, name, font), y + cell // 2 - 8), name,
                  fill=_INK, font=font)
        _vertical_text(img, (left + i * cell + cell // 2 - 9,
                             top - 6 - _text_width(draw, name, font)), name, font)
        for j in range(k):
            x = left + j * cell
            box = (x, y, x + cell - 1, y + cell - 1)
            if rows[i, 0] == 0:
                draw.rectangle(box, fill=_ABSENT)
                continue
            v = share[i, j]
            draw.rectangle(box, fill=ramp_color(v))
            pct = round(100 * v)
            if pct >= 1:
                text = str(pct)
                draw.text((x + (cell - _text_width(draw, text, small)) // 2, y + cell // 2 - 7),
                          text, fill="white" if v > 0.5 else _INK, font=small)
    for i in range(k + 1):  # thin lines between cells, a frame around the diagonal
        draw.line([(left, top + i * cell), (left + k * cell, top + i * cell)], fill=_GRID)
        draw.line([(left + i * cell, top), (left + i * cell, top + k * cell)], fill=_GRID)
    for i in range(k):
        x, y = left + i * cell, top + i * cell
        if rows[i, 0]:
            draw.rectangle((x, y, x + cell, y + cell), outline=_INK)
    steps = 100  # the colour scale, 0 % at the bottom
    span = k * cell
    for s in range(steps):
        y0 = top + span - (s + 1) * span / steps
        draw.rectangle((bar_x, y0, bar_x + 16, y0 + span / steps + 1), fill=ramp_color(s / 99))
    draw.rectangle((bar_x, top, bar_x + 16, top + span), outline=_INK)
    for t in (0, 25, 50, 75, 100):
        y = top + span - t / 100 * span
        draw.line([(bar_x + 16, y), (bar_x + 20, y)], fill=_INK)
        draw.text((bar_x + 23, y - 7), f"{t}%", fill=_INK, font=small)
    return np.asarray(img)


def iou_image(iou: dict[str, float | None], palette=None, classes: list[str] | None = None,
              title: str = "IoU per class") -> np.ndarray:
    """RGB bar chart of per-class IoU, best first, each bar in its class's colour, value at
    its end and the mean as a dashed line; classes without an IoU last, marked n/a."""
    from PIL import ImageDraw

    names = list(iou)
    colors = {}
    if palette is not None:
        pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        colors = {n: tuple(int(v) for v in pal[i]) for i, n in enumerate(classes or names)
                  if i < len(pal)}
    scored = sorted((n for n in names if iou[n] is not None), key=lambda n: -iou[n])
    order = scored + [n for n in names if iou[n] is None]
    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max([_text_width(probe, n, font) for n in names] + [40]) + 14
    row, bar_w = 22, 420
    left, top = name_w, 52
    width, height = left + bar_w + 70, top + row * len(order) + 24
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    present = [iou[n] for n in scored]
    mean = sum(present) / len(present) if present else None
    head = f"{title} (mean {mean:.3f} over {len(present)} classes)" if present else title
    draw.text((8, 6), head, fill=_INK, font=font)
    for t in range(6):  # a grid every 0.2
        x = left + t / 5 * bar_w
        draw.line([(x, top - 4), (x, top + row * len(order))], fill=_GRID)
        label = f"{t / 5:.1f}"
        draw.text((x - _text_width(draw, label, small) // 2, top - 20), label, fill=_INK,
                  font=small)
    for i, name in enumerate(order):
        y = top + i * row
        draw.text((left - 8 - _text_width(draw, name, font), y + 3), name, fill=_INK, font=font)
        v = iou[name]
        if v is None:
            draw.text((left + 4, y + 4), "n/a (not in ground truth or prediction)",
                      fill=(120, 120, 120), font=small)
            continue
        end = left + max(1.0, v * bar_w)
        draw.rectangle((left, y + 3, end, y + row - 3), fill=colors.get(name, (70, 110, 170)),
                       outline=_INK)
        draw.text((end + 5, y + 4), f"{v:.3f}", fill=_INK, font=small)
    if mean is not None:
        x = left + mean * bar_w
        for y in range(top - 4, top + row * len(order), 8):
            draw.line([(x, y), (x, y + 4)], fill=(200, 30, 30), width=2)
        label = f"mean {mean:.3f}"
        draw.text((x - _text_width(draw, label, small) // 2, top + row * len(order) + 4), label,
                  fill=(200, 30, 30), font=small)
    return np.asarray(img)


def write_evaluation_pictures(out: Path, scores: dict, classes: list[str], palette=None) \
        -> list[Path]:
    """`confusion.png` and `iou.png` beside metrics.json, from ConfusionMatrix.compute's dict."""
    out = Path(out)
    return [write_png(out / "confusion.png", confusion_image(scores["confusion"], classes)),
            write_png(out / "iou.png", iou_image(scores["iou"], palette, classes))]
