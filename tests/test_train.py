"""The training engine: it learns, many processes equal one, AMP steps, LR schedule, NaN stops."""

from __future__ import annotations

import csv
from dataclasses import asdict, replace

import pytest
import torch
import torch.multiprocessing as mp
from helpers import blocks, ddp_worker, free_port, tiny

from pipeline.labels import get_mapping
from train import fit as fit_module
from train.checkpoint import load_checkpoint
from train.engine import TrainingError, train_step
from train.fit import fit
from train.losses import build_loss
from train.models.plain import UNet
from train.optim import lr_factor


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_overfits_a_handful_of_samples(make_dataset, tmp_path):
    images, labels, names = blocks(4)
    data = make_dataset({"train": (images, labels, names), "val": (images, labels, names)})
    row = fit(tiny(data, tmp_path / "run", epochs=100, optimizer="adamw", lr=3e-2, eval_every=100))
    assert row["val_miou"] >= 0.9
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 101))
    assert float(rows[-1]["train_loss"]) < 0.3 * float(rows[0]["train_loss"])
    assert float(rows[-1]["val_miou"]) == pytest.approx(row["val_miou"])
    assert rows[0]["val_miou"] == ""  # evaluated every 100 epochs only
    assert (tmp_path / "run" / "predictions" / "epoch_100" / "val.png").is_file()


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_the_same_global_batch(make_dataset, tmp_path):
    images, labels, names = blocks(12)
    data = make_dataset({"train": (images[:8], labels[:8], names[:8]),
                         "val": (images[8:], labels[8:], names[8:])})
    # Crops within the image (scale >= 1) keep every pixel labelled on every rank.
    cfg = tiny(data, tmp_path / "one", batch_size=4, crop=(24, 32), scale=(1.0, 1.5), flip=True,
               jitter=0.2, lr=0.1)
    one = fit(cfg)
    two_cfg = replace(cfg, out=str(tmp_path / "two"), batch_size=2)
    mp.spawn(ddp_worker, args=(2, free_port(), asdict(two_cfg)), nprocs=2)

    a = weights(tmp_path / "one/checkpoints/last.pt")
    b = weights(tmp_path / "two/checkpoints/last.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
    torch.manual_seed(cfg.seed)  # what fit starts from
    assert not torch.allclose(a["head.weight"], UNet(19, width=8, depth=2).head.weight)
    two = load_checkpoint(tmp_path / "two/checkpoints/last.pt")
    assert two["step"] == 4 and two["epoch"] == 2  # 8 samples / global batch 4, 2 epochs
    assert two["metrics"]["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert two["metrics"]["val_miou"] == pytest.approx(one["val_miou"], abs=1e-3)
    # rank 0 alone writes: one TensorBoard file, one row per epoch
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1
    assert (tmp_path / "two" / "metrics.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_step_runs_in_low_precision_and_learns(amp, dtype):
    torch.manual_seed(0)
    model = UNet(19, width=4, depth=2)
    images, labels, _ = blocks(2, 16, 16)
    mean, std = images.mean() / 255, images.std() / 255
    batch = {"image": (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std,
             "label": torch.from_numpy(labels).long()}
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    criterion = build_loss("segment", palette=get_mapping("trainid").palette)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    losses = [train_step(model, batch, criterion, optimizer, scaler, amp=amp, clip_grad=1.0)
              for _ in range(8)]
    assert set(seen) == {dtype}
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    if amp == "fp16":
        assert scaler.get_scale() > 0 and scaler.is_enabled()


def test_lr_warmup_then_poly_decay_to_zero():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4) == 1.0
    assert lr_factor(7, 10, 4) == pytest.approx(0.5**0.9)
    assert lr_factor(10, 10, 4) == 0.0
    assert lr_factor(0, 100, 0) == 1.0
    # a time budget half spent decays the LR as if half the steps were done
    assert lr_factor(10, 100, 0, time_fraction=0.5) == pytest.approx(0.5**0.9)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(make_dataset, tmp_path,
                                                                  monkeypatch):
    images, labels, names = blocks(8)
    data = make_dataset({"train": (images, labels, names), "val": (images[:2], labels[:2],
                                                                    names[:2])})
    real = fit_module.build_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)

        def forward(outputs, label):
            calls.append(torch.is_grad_enabled())  # False in evaluation
            value = loss(outputs, label)
            return value * float("nan") if sum(calls) == 3 and calls[-1] else value  # epoch 2

        forward.predict = loss.predict  # outputs -> classes stay the loss's own
        return forward

    monkeypatch.setattr(fit_module, "build_loss", lambda *a, **k: _Wrap(poisoned(*a, **k)))
    cfg = tiny(data, tmp_path / "run", epochs=3)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2, step 3"):
        fit(cfg)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and last["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


class _Wrap(torch.nn.Module):
    """Lets a plain function stand where the engine expects a loss module."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, outputs, label):
        return self.fn(outputs, label)

    def predict(self, outputs):
        return self.fn.predict(outputs)
