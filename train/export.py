"""Full-resolution evaluation against the original label PNGs, and the official export.

The model sees each sample at shard size (as in training); its outputs are upsampled
bilinearly to the original label's size before the argmax (smoother than upsampling class
ids), and scored against the original `*_gtFine_labelIds.png` remapped by the mapping.
With `export_dir`, each prediction is also written as `{city}_{seq}_{frame}_pred.png`
holding labelIds (`mapping.export_ids`), the format cityscapesScripts' evaluator reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.cityscapes import read_label_ids
from pipeline.labels import Mapping, get_mapping
from pipeline.shards import load_manifest, open_shard, read_names, split_shards
from train.engine import autocast
from train.losses import predict_classes
from train.metrics import ConfusionMatrix
from train.predict import InputError, to_input
from train.visualize import write_png


def _as_mapping(mapping: Mapping | dict | str) -> Mapping:
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, dict):
        return Mapping.from_json(mapping)
    return get_mapping(mapping)


@torch.inference_mode()
def evaluate_full_resolution(
    model: torch.nn.Module,
    data_dir: Path,
    split: str,
    datadir: Path,
    *,
    export_dir: Path | None = None,
    mapping: Mapping | dict | str,
    mean,
    std,
    losstype: str = "segment",
    device: str | torch.device = "cpu",
    amp: str = "off",
    batch_size: int = 4,
) -> dict:
    """Score `split` of the shards in `data_dir` at the resolution of the originals in `datadir`.

    Returns ConfusionMatrix.compute's dict plus "images". Runs in one process.
    """
    from pipeline.cityscapes import find_pairs  # written alongside; only this path needs it

    mapping = _as_mapping(mapping)
    manifest = load_manifest(data_dir)
    shards = split_shards(data_dir, manifest, split)
    pairs = {p.name: p for p in find_pairs(Path(datadir), split)}
    names = []
    for path, _ in shards:
        with open_shard(path) as f:
            names += read_names(f)
    missing = [n for n in names if n not in pairs]
    if missing:
        raise InputError(
            f"{datadir}: no original image/label for {len(missing)} of the {len(names)} "
            f"{split} samples in {data_dir} (first: {missing[0]}); is --datadir the tree "
            "these shards were made from?"
        )

    palette = mapping.palette
    cm = ConfusionMatrix(mapping.num_classes, device=device)
    images = 0
    was_training = model.training
    model.eval()
    try:
        for path, _ in shards:
            with open_shard(path) as f:
                shard_names = read_names(f)
                for start in range(0, len(shard_names), batch_size):
                    batch = f["image"][start:start + batch_size]
                    with autocast(torch.device(device), amp):
                        outputs = model(to_input(batch, mean, std, device))
                    for out, name in zip(outputs, shard_names[start:start + batch_size]):
                        pair = pairs[name]
                        target = mapping.remap(read_label_ids(pair.label), source=pair.label)
                        full = F.interpolate(out[None].float(), size=target.shape,
                                             mode="bilinear", align_corners=False)
                        pred = predict_classes(full, losstype, palette)[0]
                        cm.update(pred, torch.from_numpy(target))
                        if export_dir is not None:
                            ids = mapping.export_ids[pred.to(torch.uint8).cpu().numpy()]
                            write_png(Path(export_dir) / f"{name}_pred.png", ids)
                        images += 1
    finally:
        model.train(was_training)
    return {**cm.compute(mapping.classes, mapping.categories), "images": images}
