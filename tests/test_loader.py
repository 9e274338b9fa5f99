"""The loader contract on both backends: alignment, exact epochs, determinism, resume, errors.

Images encode their own label (class k is a pure primary colour), so after any augmentation
the class read back from a pixel's colour must equal the label tensor there.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import BACKENDS, PRIMARY_SIZE, primary_frames

from pipeline import loader as loader_module
from pipeline.loader import build_loader, dali_available
from pipeline.shards import ShardError

H, W = PRIMARY_SIZE  # shard size
CROP = (48, 96)


@pytest.fixture
def data(make_dataset) -> tuple[Path, dict]:
    splits = {"train": primary_frames(10, 0), "val": primary_frames(7, 1)}
    return make_dataset(splits, shard_size=4), splits


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def load(data_dir, split, batch_size, backend, **kwargs):
    kwargs = {"workers": 0, "crop": CROP, "device": "cpu", **kwargs}  # the CPU, on any machine
    return build_loader(data_dir, split, batch_size, train=split == "train", backend=backend,
                        **kwargs)


def raw(loader, image: torch.Tensor) -> np.ndarray:
    """Normalized (N, 3, H, W) -> 0-1 (N, H, W, 3)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (loader.mean, loader.std))
    return (image.float() * std + mean).permute(0, 2, 3, 1).numpy()


def collect(loader) -> list[dict]:
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_identity_geometry_is_exact_and_flip_moves_image_and_label_together(data, backend):
    folder, splits = data
    images, labels, _ = splits["train"]
    loader = load(folder, "train", 5, backend, crop=(H, W), scale=(1, 1), jitter=0)
    flipped = []
    for batch in loader:
        got = np.rint(raw(loader, batch["image"]) * 255)
        for img, lab, i in zip(got, batch["label"].numpy(), batch["index"].tolist()):
            flip = not np.array_equal(lab, labels[i])
            assert np.array_equal(lab, labels[i][:, ::-1] if flip else labels[i])
            assert np.array_equal(img, images[i][:, ::-1] if flip else images[i])
            flipped.append(flip)
    assert len(flipped) == 10 and any(flipped) and not all(flipped)


def test_augmented_labels_stay_aligned_with_their_pixels(data, backend):
    """Scale 0.5-2, crop, flip, pad; then the same with colour jitter, which moves no pixel."""
    folder, _ = data
    plain, jittered = (load(folder, "train", 5, backend, jitter=j) for j in (0, 0.2))
    checked, padded = 0, 0
    for _ in range(2):
        for a, b in zip(plain, jittered):
            assert a["image"].shape == (5, 3, *CROP) and a["label"].shape == (5, *CROP)
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
            assert not torch.allclose(a["image"], b["image"], atol=0.05)
            for img, jit, lab in zip(raw(plain, a["image"]), raw(jittered, b["image"]),
                                     a["label"].numpy()):
                pad = lab == 255
                rows, cols = (~pad).any(1).sum(), (~pad).any(0).sum()
                assert not pad[:rows, :cols].any() and pad[rows:].all() and pad[:, cols:].all()
                # without jitter a pixel's channels are its classes' interpolation weights;
                # nearest picks a source pixel of weight >= 1/4, so a class above 3/4 is it
                clear = ~pad & (img.max(-1) > 0.75)
                assert np.array_equal(img.argmax(-1)[clear], lab[clear])
                assert clear.sum() > 0.5 * (~pad).sum() and np.all(img[pad] < 1e-6)
                pure = ~pad & (img.max(-1) > 0.99)  # jitter keeps a primary's hue dominant
                assert np.array_equal(jit.argmax(-1)[pure], lab[pure])
                grey = jit[pad]  # padding: black, still grey after jitter
                assert np.all(grey.max(-1) - grey.min(-1) < 0.02) and np.all(grey < 0.11)
                checked, padded = checked + 1, padded + pad.any()
    assert checked == 20 and 0 < padded < 20


@pytest.mark.parametrize("batch_size", [2, 3])
def test_evaluation_reads_every_sample_exactly_once_across_ranks(data, backend, batch_size):
    folder, splits = data
    images, labels, _ = splits["val"]
    for world_size in range(1, 5):
        seen = []
        for rank in range(world_size):
            loader = load(folder, "val", batch_size, backend, rank=rank, world_size=world_size)
            batches = list(loader)
            assert len(batches) == len(loader)
            sizes = [len(b["index"]) for b in batches]
            assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
            for b in batches:
                index = b["index"].tolist()
                assert b["image"].shape[1:] == (3, H, W)
                assert np.array_equal(b["label"].numpy(), labels[index])
                assert np.allclose(raw(loader, b["image"]) * 255, images[index], atol=0.01)
                seen += index
        assert sorted(seen) == list(range(7)), (world_size, seen)


def test_training_gives_every_rank_the_same_batches_of_distinct_samples(data, backend):
    folder, _ = data
    for world_size in range(1, 5):
        per_rank = []
        for rank in range(world_size):
            loader = load(folder, "train", 3, backend, rank=rank, world_size=world_size)
            batches = list(loader)
            assert len(batches) == len(loader) == 10 // (3 * world_size)
            assert all(len(b["index"]) == 3 for b in batches)
            per_rank.append([i for b in batches for i in b["index"].tolist()])
        epoch = [i for indices in per_rank for i in indices]
        assert len(epoch) == len(set(epoch)) == 10 // (3 * world_size) * 3 * world_size


def test_same_seed_same_batches_and_each_epoch_a_new_order(data, backend):
    folder, _ = data
    a, b, c = (load(folder, "train", 2, backend, seed=s) for s in (0, 0, 1))
    a0, a1 = collect(a), collect(a)
    assert same(a0, collect(b)) and same(a1, collect(b))
    assert a.epoch == 2 and a.state_dict() == {"epoch": 2, "batch": 0, "global_batch": 2}
    order = [torch.cat([x["index"] for x in run]).tolist() for run in (a0, a1, collect(c))]
    assert order[0] != order[1] and order[0] != order[2]
    assert not torch.equal(a0[0]["image"], a1[0]["image"])


def test_resume_from_state_dict_replays_the_uninterrupted_run(data, backend):
    folder, _ = data
    whole = load(folder, "train", 2, backend)
    expected = collect(whole) + collect(whole)
    first = load(folder, "train", 2, backend)
    head = []
    for batch in first:
        head.append({k: v.clone() for k, v in batch.items()})
        if len(head) == 2:
            break
    state = first.state_dict()
    assert state == {"epoch": 0, "batch": 2, "global_batch": 2}
    resumed = load(folder, "train", 2, backend)
    resumed.load_state_dict(state)
    tail = collect(resumed) + collect(resumed)
    assert same(head + tail, expected)


def test_abandoned_evaluation_pass_does_not_shorten_the_next(data, backend):
    folder, _ = data
    loader = load(folder, "val", 3, backend)
    next(iter(loader))
    assert torch.cat([b["index"] for b in loader]).tolist() == list(range(7))


def _children() -> list[bytes]:
    """Command lines of this process's children (Linux)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if pid.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_are_spawned_not_forked_and_read_the_same_batches(data, backend):
    folder, _ = data
    expected = collect(load(folder, "train", 2, backend, workers=0))
    loader = load(folder, "train", 2, backend, workers=2)
    got = []
    for batch in loader:
        got.append({k: v.clone() for k, v in batch.items()})
        if len(got) == 1:
            kids = _children()
    assert same(got, expected)
    ours = Path("/proc/self/cmdline").read_bytes()
    assert sum(b"spawn_main" in k for k in kids) >= 2 and ours not in kids
    loader.close()


def test_batch_types_layout_and_metadata(data, backend):
    folder, _ = data
    loader = load(folder, "train", 4, backend, dtype=torch.float16, channels_last=True,
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batch = next(iter(loader))
    image, label, index = batch["image"], batch["label"], batch["index"]
    assert image.dtype == torch.float16 and image.shape == (4, 3, *CROP)
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label.dtype == torch.int64 and set(label.unique().tolist()) <= {0, 1, 2, 255}
    assert index.dtype == torch.int64 and index.shape == (4,)
    assert loader.device == torch.device("cpu") and image.device == loader.device
    assert loader.num_samples == 10 and len(loader) == 2
    assert loader.num_classes == 19 == len(loader.classes) and loader.ignore_index == 255
    assert loader.palette.shape == (19, 3) and loader.palette.dtype == np.uint8
    assert loader.mean == (0.5, 0.5, 0.5) and loader.manifest["splits"]["train"]["samples"] == 10
    val = load(folder, "val", 4, backend)
    assert val.mean == tuple(val.manifest["mean"]) and val.std == tuple(val.manifest["std"])


@pytest.mark.slow
def test_backends_give_identical_batches_on_the_cpu(data):
    if not dali_available():
        pytest.skip("nvidia.dali not installed")
    folder, _ = data
    for workers in (0, 2):
        dali, torch_ = (collect(load(folder, "train", 5, b, workers=workers))
                        for b in ("dali", "torch"))
        assert len(dali) == 2 and same(dali, torch_)  # on the CPU: identical, bit for bit


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_bad_shard_fails_at_build_time_naming_the_file(data, damage):
    folder, _ = data
    shard = folder / "train-00001.h5"
    if damage == "missing":
        shard.unlink()
    elif damage == "corrupt":
        shard.write_bytes(b"not an hdf5 file" * 100)
    else:
        shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(ShardError, match="train-00001.h5"):
        build_loader(folder, "train", 2, train=True, backend="torch", device="cpu")


def test_damaged_sample_fails_while_loading_with_a_clear_error(make_dataset, backend):
    folder = make_dataset({"train": primary_frames(4, 0)}, compression="gzip")
    shard = folder / "train-00000.h5"
    with h5py.File(shard, "r") as f:
        chunk = f["image"].id.get_chunk_info(1)
    with open(shard, "r+b") as f:  # garbage in place of sample 1's compressed image
        f.seek(chunk.byte_offset)
        f.write(bytes(range(256)) * (chunk.size // 256))
    loader = load(folder, "train", 2, backend, scale=(1, 1), crop=(H, W))
    with pytest.raises(ShardError, match="train-00000.h5: sample 1 unreadable"):
        for _ in range(2):
            list(loader)


def test_missing_split_and_folder_are_clear_errors(data, tmp_path):
    folder, _ = data
    with pytest.raises(ShardError, match="no split 'test'"):
        build_loader(folder, "test", 2, train=False, backend="torch", device="cpu")
    with pytest.raises(ShardError, match="no such data folder"):
        build_loader(tmp_path / "nowhere", "train", 2, train=True, backend="torch",
                     device="cpu")


def test_without_dali_the_torch_fallback_is_chosen_with_a_notice(data, monkeypatch, capsys):
    folder, _ = data
    monkeypatch.setattr(loader_module, "dali_available", lambda: False)
    monkeypatch.setattr(loader_module, "_noticed", [])
    loaders = [build_loader(folder, "val", 2, train=False, workers=0, device="cpu")
               for _ in range(2)]
    assert all(type(x).__name__ == "TorchLoader" for x in loaders)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "torch DataLoader" in notice[0]
    with pytest.raises(ImportError, match="nvidia-dali"):
        build_loader(folder, "val", 2, train=False, backend="dali", device="cpu")


def test_a_crop_larger_than_the_shards_is_warned_about(data, capsys):
    folder, _ = data
    load(folder, "train", 2, "torch", crop=(256, 512), scale=(1, 1))
    err = capsys.readouterr().err
    assert "warning: crop 256x512 (HxW) is larger than the shards (128x64 (WxH), 64x128 (HxW))" \
        in err
    assert "94% of each training sample is padding" in err and "--crop 64x128" in err
    load(folder, "train", 2, "torch", crop=(H, W))
    assert capsys.readouterr().err == ""


def test_default_workers_share_the_usable_cpus_among_local_ranks(monkeypatch):
    monkeypatch.setattr(loader_module, "usable_cpus", lambda: 200)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_module.default_workers("torch") == 25
    assert loader_module.default_workers("dali") == loader_module.READERS_PER_RANK == 4
    monkeypatch.setattr(loader_module, "usable_cpus", lambda: 2)
    assert loader_module.default_workers("torch") == loader_module.default_workers("dali") == 1


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed")
def test_the_gpu_graph_on_dalis_cpu_operators_matches_the_cpu_geometry(make_dataset):
    """The DALI graph's geometry, which only a GPU runs in training, here on DALI's CPU
    operators: on the same samples and draws as the ops' CPU steps it gives the same labels
    and images within one grey level (two implementations of bilinear)."""
    from nvidia.dali import pipeline_def

    from pipeline.augment.scale_crop_flip import OUTPUT_SIZE, WINDOW_END, WINDOW_START
    from pipeline.loader import segmentation_graph
    from pipeline.sampling import ShardReader, ShardSource

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, H, W, 3), dtype=np.uint8)  # noise: every pixel counts
    labels = rng.integers(0, 19, (16, H, W), dtype=np.uint8)
    loader = load(make_dataset({"train": (images, labels, primary_frames(16, 0)[2])}), "train", 8,
                  "dali", scale=(0.5, 1.5))
    batches = {}
    for geometry in (False, True):  # raw samples, as the CPU loader reads them; the graph's
        source = ShardSource(ShardReader(loader.files, loader.counts), loader.plan, loader.aug,
                             loader.size, 0)
        pipe = pipeline_def(segmentation_graph)(
            source, aug=loader.aug, gpu=False, parallel=False, geometry=geometry,
            batch_size=8, num_threads=1, device_id=None, seed=0)
        pipe.build()
        batches[geometry] = [[out.as_array() for out in pipe.run()] for _ in range(2)]
    flipped = padded = magnified = 0
    for (image, label, index, params), (got, got_label, got_index, _) in zip(batches[False],
                                                                             batches[True]):
        want, want_label = loader.aug.cpu_batch(torch.from_numpy(image), torch.from_numpy(label),
                                                torch.from_numpy(params))
        assert np.array_equal(got_index, index) and got.shape == (8, *CROP, 3)
        assert np.array_equal(got_label[..., 0], want_label.numpy())
        assert np.abs(got.astype(np.int16) - want.numpy()).max() <= 1
        geometry = params[:, loader.aug.fields("scale_crop_flip")]
        flipped += int((geometry[:, WINDOW_END][:, 1] < geometry[:, WINDOW_START][:, 1]).sum())
        padded += int((want_label == 255).flatten(1).any(1).sum())
        window = geometry[:, WINDOW_END][:, 0] - geometry[:, WINDOW_START][:, 0]
        magnified += int((geometry[:, OUTPUT_SIZE][:, 0] > window).sum())
    assert 0 < flipped < 16 and 0 < padded < 16 and 0 < magnified < 16


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed")
def test_a_dali_built_for_another_cuda_is_named_once_with_the_fix(data, monkeypatch, capsys):
    """Two CUDA runtimes in one process: a GPU loader says so when it is built, once."""
    import nvidia.dali

    monkeypatch.setattr(nvidia.dali, "__cuda_version__", 12090, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(loader_module, "_noticed", [])
    for _ in range(2):  # building touches no GPU: that waits for the first batch
        build_loader(data[0], "train", 2, train=True, crop=CROP, device=torch.device("cuda", 0),
                     backend="dali", workers=0)
    assert capsys.readouterr().err.splitlines() == [
        "warning: nvidia-dali is built for CUDA 12 and torch for CUDA 13: two CUDA runtimes in "
        "one process; install the matching build: pip install -e '.[cuda13]' (make install "
        "CUDA=13)"]
    monkeypatch.setattr(nvidia.dali, "__cuda_version__", 13000)
    assert loader_module.dali_cuda_mismatch() is None
