"""What only a GPU can show: the DALI GPU graph, AMP steps without host syncs, the confusion
matrix on CUDA, NCCL across two GPUs. Every test here skips, saying why, without CUDA."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import (
    GUESS,
    INSTANCES,
    PRIMARY_SIZE,
    TRAINID,
    blocks,
    ddp_worker,
    free_port,
    primary_frames,
    tiny,
)

from pipeline.labels import get_mapping
from pipeline.loader import build_loader, dali_available
from train import engine, optim
from train.checkpoint import load_checkpoint
from train.config import Config
from train.evaluation.metrics import ConfusionMatrix, InstanceStats
from train.fit import fit
from train.losses import build_loss
from train.models.plain import UNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (these check what the CPU cannot)")
H, W = PRIMARY_SIZE
CROP = (48, 96)  # as the loader tests' crop
needs_dali = pytest.mark.skipif(not dali_available(), reason="needs nvidia-dali")


@pytest.fixture
def data(make_dataset):
    return make_dataset({"train": primary_frames(10, 0), "val": primary_frames(7, 1)}, shard_size=4)


def _unnormalize(loader, image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(loader.mean, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(loader.std, device=image.device).view(1, 3, 1, 1)
    return (image.float() * std + mean).permute(0, 2, 3, 1).cpu().numpy()


@needs_dali
@pytest.mark.parametrize("workers", [0, 2])
def test_dali_gpu_graph_keeps_labels_on_their_pixels(data, workers):
    """Scale 0.5-2, crop, flip and pad on the GPU: each pixel's colour still names its label."""
    loader = build_loader(data, "train", 5, train=True, crop=CROP, jitter=0, device="cuda",
                          backend="dali", workers=workers)
    checked = padded = 0
    for _ in range(2):
        for batch in loader:
            assert batch["image"].is_cuda and batch["label"].is_cuda
            assert batch["image"].shape == (5, 3, *CROP) and batch["label"].dtype == torch.int64
            for img, lab in zip(_unnormalize(loader, batch["image"]),
                                batch["label"].cpu().numpy()):
                pad = lab == 255
                rows, cols = (~pad).any(1).sum(), (~pad).any(0).sum()
                assert not pad[:rows, :cols].any() and pad[rows:].all() and pad[:, cols:].all()
                clear = ~pad & (img.max(-1) > 0.75)
                assert np.array_equal(img.argmax(-1)[clear], lab[clear])
                assert clear.sum() > 0.5 * (~pad).sum() and np.all(img[pad] < 1e-3)
                checked, padded = checked + 1, padded + pad.any()
    assert checked == 20 and 0 < padded < 20
    loader.close()


@needs_dali
def test_dali_gpu_identity_geometry_is_exact(data):
    images, labels, _ = primary_frames(10, 0)
    loader = build_loader(data, "train", 5, train=True, crop=(H, W), scale=(1, 1), jitter=0,
                          device="cuda", backend="dali", workers=0)
    for batch in loader:
        got = np.rint(_unnormalize(loader, batch["image"]) * 255)
        for img, lab, i in zip(got, batch["label"].cpu().numpy(), batch["index"].tolist()):
            flip = not np.array_equal(lab, labels[i])
            assert np.array_equal(lab, labels[i][:, ::-1] if flip else labels[i])
            assert np.array_equal(img, images[i][:, ::-1] if flip else images[i])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_on_cuda_waits_for_nothing(amp):
    """Finite fp32 loss, a GradScaler only for fp16, fused optimizer, no host sync."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = UNet(19, width=8, depth=2).to(device)
    images, labels, _ = blocks(4, 32, 64)
    batch = {"image": torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device),
             "label": torch.from_numpy(labels).long().to(device)}
    criterion = build_loss("segment", palette=get_mapping("trainid").palette).to(device)
    optimizer = optim.build_optimizer(model, Config(optimizer="sgd", lr=0.05))
    assert optimizer.defaults["fused"]
    # a scale that overflows at once: the first step is skipped, as fp16's first steps often are
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**18, enabled=amp == "fp16")
    losses = [engine.train_step(model, batch, criterion, optimizer, scaler, amp=amp)]
    torch.cuda.set_sync_debug_mode("error")  # any blocking call below raises
    try:
        for _ in range(4):
            losses.append(engine.train_step(model, batch, criterion, optimizer, scaler, amp=amp,
                                            clip_grad=1.0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = torch.stack(losses).tolist()
    assert all(np.isfinite(values)) and all(loss.dtype == torch.float32 for loss in losses)
    assert scaler.is_enabled() == (amp == "fp16")
    if amp == "fp16":
        assert scaler.get_scale() < 2.0**18  # it backed off, and the steps after stay finite


def test_confusion_matrix_is_the_same_on_cpu_and_cuda():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 19, 64, 96, generator=g)
    target = torch.randint(0, 19, (3, 64, 96), generator=g)
    target[:, :5] = 255
    mats = []
    for device in ("cpu", "cuda"):
        cm = ConfusionMatrix(19, device=device)
        cm.update(logits.to(device).argmax(1), target.to(device))
        mats.append(cm.mat.cpu())
    assert torch.equal(mats[0], mats[1]) and mats[0].sum() == 3 * 59 * 96


def test_the_confusion_matrix_counts_on_cuda_without_a_host_sync():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 19, (2, 64, 96), generator=g)
    target = torch.randint(0, 19, (2, 64, 96), generator=g).to(torch.uint8)
    target[:, :5] = 255
    pred, target = pred.cuda(), target.cuda()
    cm = ConfusionMatrix(19, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any blocking call below raises
    try:
        cm.update(pred, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cm.mat.sum().item() == 2 * 59 * 96


def test_full_resolution_instance_scores_on_cuda_take_the_pngs_uint16_ids():

    ids = INSTANCES.numpy().astype(np.uint16)  # as read_instance_ids hands them out
    sums = []
    for device in ("cpu", "cuda"):
        stats = InstanceStats(TRAINID, device=device)
        stats.update(GUESS.to(device), ids)
        sums.append(stats.sums.cpu())
    assert sums[0].abs().sum() > 0
    torch.testing.assert_close(sums[1], sums[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_cpu_checkpoint_resumes_on_the_gpus_fused_kernels(optimizer):
    cfg = Config(optimizer=optimizer, lr=0.01)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    cpu = optim.build_optimizer(model, cfg)
    model(x).square().mean().backward()
    cpu.step()
    model.cuda()
    gpu = optim.build_optimizer(model, cfg)
    assert gpu.defaults["fused"]
    optim.load_optimizer_state(gpu, cpu.state_dict())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**18)  # overflows first: skipped
    for _ in range(3):
        gpu.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x.cuda()).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(gpu)
        scaler.update()
    torch.cuda.synchronize()
    assert all(v.is_cuda for p in model.parameters() for v in gpu.state[p].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for 2 NCCL processes")
def test_two_nccl_processes_train_like_one_gpu(make_dataset, tmp_path):
    images, labels, names = blocks(12)
    data = make_dataset({"train": (images[:8], labels[:8], names[:8]),
                         "val": (images[8:], labels[8:], names[8:])})
    cfg = replace(tiny(data, tmp_path / "one", crop=(24, 32), lr=0.1, tf32=False),
                  device="cuda")
    one = fit(cfg)
    two = replace(cfg, out=str(tmp_path / "two"), batch_size=2)
    mp.spawn(ddp_worker, args=(2, free_port(), asdict(two)), nprocs=2)
    state = load_checkpoint(tmp_path / "two/checkpoints/last.pt")
    assert state["world_size"] == 2 and state["step"] == 4 and state["epoch"] == 2
    assert state["metrics"]["train_loss"] == pytest.approx(one["train_loss"], rel=2e-2)
