"""`citytrain bench-inference --onnx`: onnxruntime against PyTorch on the same model and image.

Both run what the exported file does (train/onnx_export.py: Deployable): a uint8 RGB image in,
normalization, the U-Net, logits out, on one whole image per call, with the same number of
threads; the file is exported once with symbolic sizes and serves every size. The model has
random weights (speed only); the largest logit difference is printed beside the speeds as a
reminder that both compute the same thing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from train.bench import bench_model, describe
from train.distributed import local_device
from train.onnx_export import Deployable, to_onnx
from train.onnx_runtime import open_session

SIZES = ((512, 1024), (1024, 2048))  # (H, W): the shards' usual size and the originals'


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, images: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(images):
        fn()
    return images / (time.perf_counter() - start)


def run_runtime_bench(*, sizes: tuple[tuple[int, int], ...] = SIZES, encoder: str = "plain",
                      width: int = 16, depth: int = 4, num_classes: int = 19, images: int = 3,
                      warmup: int = 1, device: str = "cpu") -> dict:
    """Images/s of PyTorch and of onnxruntime for one image of each (H, W) in `sizes`."""
    dev = local_device(device)
    torch.manual_seed(0)
    net = bench_model(encoder, num_classes, width=width, depth=depth)
    model = Deployable(net, (0.3, 0.3, 0.3), (0.2, 0.2, 0.2)).eval()
    rng = np.random.default_rng(0)
    example = torch.from_numpy(rng.integers(0, 256, (2, 64, 128, 3), dtype=np.uint8))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.onnx"
        to_onnx(model, example, "logits", path).save(str(path), external_data=False)
        session = open_session(path, dev, threads=threads)
        on_device = model.to(dev)
        rows = []
        for size in sizes:
            image = rng.integers(0, 256, (1, *size, 3), dtype=np.uint8)

            def torch_run(image=image):
                with torch.inference_mode():
                    out = on_device(torch.from_numpy(image).to(dev)).cpu()
                _sync(dev)
                return out

            def ort_run(image=image):
                return session.run(None, {"image": image})[0]

            diff = float((torch_run() - torch.from_numpy(ort_run())).abs().max())
            rows.append({"size": {"height": int(size[0]), "width": int(size[1])},  # as files
                         "torch_images_per_s": _rate(torch_run, images, warmup),
                         "onnx_images_per_s": _rate(ort_run, images, warmup), "max_abs": diff})
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "provider": session.get_providers()[0], "threads": threads, "encoder": encoder,
            "model": describe(net), "width": width, "depth": depth, "images": images,
            "rows": rows}


def format_runtime_report(r: dict) -> str:
    lines = [f"whole-image inference, uint8 in, logits out: {r['model']} (random weights), "
             f"fp32, on {r['device']} ({r['threads']} threads), "
             f"{r['images']} images per row; onnxruntime {r['provider']}"]
    for row in r["rows"]:
        h, w = row["size"]["height"], row["size"]["width"]
        lines.append(f"  {f'{w}x{h}':>9} (WxH)  PyTorch {row['torch_images_per_s']:7.3f} "
                     "images/s   "
                     f"onnxruntime {row['onnx_images_per_s']:7.3f} images/s   "
                     f"({row['onnx_images_per_s'] / row['torch_images_per_s']:.2f}x, "
                     f"max |logit diff| {row['max_abs']:.1e})")
    return "\n".join(lines)
