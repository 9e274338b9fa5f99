"""What an evaluation says and writes: metrics.json's text, the terminal summary, the line
`fit` ends with, and the results folder (metrics.json, confusion.png, iou.png).

Which scores come first, and how the summary names them, is the table's
(`train/evaluation/scores.py`): a score added there is listed and said with no change here.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import sizes
from pipeline.files import atomic_write_bytes
from train.evaluation.inference import Inference
from train.evaluation.pictures import write_evaluation_pictures
from train.evaluation.scores import headlines


def head() -> tuple[str, ...]:
    """What metrics.json lists first, what a reader looks for: the headline scores."""
    return ("split", "resolution", "images", *(s.name for s in headlines()))


def metrics_text(metrics: dict) -> str:
    """metrics.json's text: keys in `head()`'s order first, one line per confusion-matrix row."""
    body = {k: metrics[k] for k in head() if k in metrics}
    body.update((k, v) for k, v in metrics.items() if k not in body and k != "confusion")
    text = json.dumps(body, indent=1)
    if metrics.get("confusion") is not None:
        rows = ",\n  ".join(json.dumps(r) for r in metrics["confusion"])
        text = f'{text[:-2]},\n "confusion": [\n  {rows}\n ]\n}}'
    return text + "\n"


def write_results(out: Path, metrics: dict, classes: list[str], palette=None) -> list[Path]:
    """metrics.json, confusion.png and iou.png into `out`, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "metrics.json", metrics_text(metrics).encode())
    return [out / "metrics.json", *write_evaluation_pictures(out, metrics, classes, palette)]


def inference_record(inference: Inference, amp: str, size: tuple[int, int]) -> dict:
    """metrics.json's "inference": the settings, and the size the model sees at scale 1."""
    return {**inference.to_json(), "amp": amp, "model_size": sizes.to_file(size)}


def scores_text(metrics: dict) -> str:
    """The headline scores on one line: the four official ones, pixel accuracy ('n/a' where
    not measured)."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    return ", ".join(f"{s.label} {fmt(metrics.get(s.name))}" for s in headlines())


def said(metrics: dict, folder: Path) -> str:
    """What `fit` says of its final evaluation: how it ran, its scores, where they are."""
    s = metrics["inference"]
    how = s["mode"]
    if s["mode"] == "slide":
        how += f" {sizes.text(sizes.from_file(s['window']))} (HxW)"
    if s["scales"] != [1.0]:
        how += f", scales {','.join(f'{v:g}' for v in s['scales'])}"
    if s["flip"]:
        how += ", flip"
    text = (f"final evaluation ({metrics['split']}, {metrics['images']} images at "
            f"{metrics['resolution']} resolution, {how}): {scores_text(metrics)}; wrote "
            f"{Path(folder) / 'metrics.json'}, confusion.png, iou.png")
    if metrics["resolution"] == "shard":
        text += ("\n(iIoU needs the originals' instance ids: `citytrain evaluate --checkpoint "
                 f"{metrics['checkpoint']} --datadir CITYSCAPES` gives all four scores)")
    return text


def format_metrics(metrics: dict) -> str:
    """The terminal summary: per-class IoU and iIoU, per-category, then the four scores."""
    def fmt(v):
        return "   n/a" if v is None else f"{v:6.4f}"

    inst, cat_inst = metrics.get("instance_iou", {}), metrics.get("category_instance_iou", {})
    lines = [f"{'class':<24}    IoU   iIoU"]
    lines += [f"{name:<24} {fmt(v)} {fmt(inst[name]) if name in inst else ''}".rstrip()
              for name, v in metrics["iou"].items()]
    lines += [f"{'category ' + name:<24} {fmt(v)} "
              f"{fmt(cat_inst[name]) if name in cat_inst else ''}".rstrip()
              for name, v in metrics["category_iou"].items()]
    lines.append(f"{metrics['split']} ({metrics['resolution']} resolution, {metrics['images']} "
                 f"images): {scores_text(metrics)}")
    if metrics["resolution"] == "shard":
        lines.append("(iIoU needs the instance ids of the originals: evaluate with --datadir)")
    elif metrics.get("iiou") is None and not inst:
        lines.append("(no *_gtFine_instanceIds.png beside the labels: no iIoU)")
    if metrics["pixel_acc"] is None:
        lines.append(f"(no labelled pixels in {metrics['split']}: if its labels are "
                     "placeholders, as the test split's are, use --submit)")
    return "\n".join(lines)
