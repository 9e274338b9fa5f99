"""A drive as a video: the synthetic demoVideo sequence, frame order from folders, zips and
video files, the MP4's frames, size and rate, and failures that name the file."""

from __future__ import annotations

import shutil
import zipfile
from fractions import Fraction

import av
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main as cityprep
from pipeline.synth import synthesize_sequence
from train.cli import main as citytrain
from train.predict import InputError
from train.video import open_frames

FRAMES, SIZE = 6, (64, 128)  # (H, W)
FOLDER = "leftImg8bit/demoVideo/stuttgart_00"


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    root = tmp_path_factory.mktemp("drive")
    synthesize_sequence(root, frames=FRAMES, size=SIZE, seed=3)
    return root


def decode(path) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], \
            Fraction(stream.average_rate)


def luma(image: np.ndarray) -> np.ndarray:
    """BT.601 luma: what yuv420p keeps at full resolution (it halves the chroma both ways)."""
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def predict_video(checkpoint, source, out, *args) -> str:
    result = CliRunner().invoke(citytrain, ["predict", "--checkpoint", str(checkpoint),
                                            "--input", str(source), "--video", str(out),
                                            "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_synth_writes_a_drive_in_the_demovideo_layout(tmp_path):
    result = CliRunner().invoke(cityprep, ["synth", str(tmp_path), "--train", "0", "--val", "0",
                                           "--sequence", "5", "--size", "128x64"])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / FOLDER).iterdir())
    assert [p.name for p in files] == [f"stuttgart_00_000000_{k:06d}_leftImg8bit.png"
                                       for k in range(1, 6)]
    images = [np.asarray(Image.open(p)).astype(int) for p in files]
    assert images[0].shape == (64, 128, 3)
    step = np.abs(images[1] - images[0]).mean()
    assert 0 < step < np.abs(images[4] - images[0]).mean()  # moving on, steadily


def test_video_frames_rate_size_and_order(unet_checkpoint, drive, tmp_path):
    out = tmp_path / "drive.mp4"
    printed = predict_video(unet_checkpoint, drive, out)
    assert f"{FRAMES} frames of 128x64 (WxH) at 17 fps" in printed
    video, rate = decode(out)
    assert len(video) == FRAMES and rate == 17  # the Cityscapes camera's rate
    assert video[0].shape == (*SIZE, 3)
    # the overlay PNGs of the same frames, from predict on the stills
    stills = tmp_path / "stills"
    result = CliRunner().invoke(citytrain, ["predict", "--checkpoint", str(unet_checkpoint),
                                            "--input", str(drive), "--out", str(stills),
                                            "--device", "cpu"])
    assert result.exit_code == 0, result.output
    overlays = [luma(np.asarray(Image.open(p)))
                for p in sorted((stills / FOLDER).glob("*_overlay.png"))]
    assert len(overlays) == FRAMES
    # the first frame is that overlay, up to H.264's losses (crf 18 on a tiny noisy frame:
    # ~3 levels, while the next frame's overlay is ~20 away)
    assert np.abs(luma(video[0]) - overlays[0]).mean() < 5
    for k, frame in enumerate(video):  # and every frame is nearest its own overlay: in order
        distances = [np.abs(luma(frame) - o).mean() for o in overlays]
        assert int(np.argmin(distances)) == k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drive.mp4", "stills"]


def test_every_and_side_by_side(unet_checkpoint, drive, tmp_path):
    out = tmp_path / "thin.mp4"
    predict_video(unet_checkpoint, drive, out, "--every", "2", "--layout", "side-by-side")
    video, rate = decode(out)
    assert len(video) == 3 and rate == Fraction(17, 2)  # as long as the drive
    assert video[0].shape == (SIZE[0], 2 * SIZE[1], 3)  # image | prediction
    first = np.asarray(Image.open(drive / FOLDER / "stuttgart_00_000000_000001_leftImg8bit.png"))
    assert np.abs(luma(video[0][:, :SIZE[1]]) - luma(first)).mean() < 5


def test_official_zip_and_a_video_file_read_as_the_folder(unet_checkpoint, drive, tmp_path):
    archive = tmp_path / "leftImg8bit_demoVideo.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("README", "demo video\n")
        for p in sorted((drive / FOLDER).iterdir(), reverse=True):  # stored out of order
            z.write(p, f"{FOLDER}/{p.name}")
    from_folder, from_zip = tmp_path / "a.mp4", tmp_path / "b.mp4"
    predict_video(unet_checkpoint, drive, from_folder)
    predict_video(unet_checkpoint, archive, from_zip)
    (a, rate_a), (b, rate_b) = decode(from_folder), decode(from_zip)
    assert rate_a == rate_b and len(a) == len(b) == FRAMES
    assert all((x == y).all() for x, y in zip(a, b))
    # the video itself as input: its frames, in order, at its rate
    again = tmp_path / "c.mp4"
    predict_video(unet_checkpoint, from_folder, again, "--fps", "25")
    c, rate_c = decode(again)
    assert len(c) == FRAMES and rate_c == 25


def test_cityscapes_order_and_plain_folders(tmp_path):
    seq = tmp_path / "leftImg8bit_sequence" / "val"
    names = [f"{city}_{s:06d}_{f:06d}" for city, s in (("munster", 3), ("frankfurt", 0),
                                                       ("frankfurt", 12))
             for f in range(8, 11)]
    for i, name in enumerate(reversed(names)):
        (seq / name.rsplit("_", 2)[0]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 16), (i, 0, 0)).save(seq / name.rsplit("_", 2)[0] /
                                                   f"{name}_leftImg8bit.png")
    (seq / "frankfurt" / "frankfurt_000000_000009_gtFine_color.png").write_bytes(b"ignored")
    frames = open_frames(tmp_path)
    assert [name for name, _ in frames.files] == sorted(names)  # city, sequence, frame
    assert frames.fps == 17 and frames.count == 9
    plain = tmp_path / "plain"
    plain.mkdir()
    for k in (10, 2, 1):
        Image.new("RGB", (32, 16), (k, 0, 0)).save(plain / f"frame_{k}.png")
    assert [n for n, _ in open_frames(plain).files] == ["frame_1", "frame_2", "frame_10"]
    assert [img[0, 0, 0] for _, img in open_frames(plain).frames()] == [1, 2, 10]


def test_a_missing_frame_is_named_and_nothing_written(unet_checkpoint, drive, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(drive, broken)
    (broken / FOLDER / "stuttgart_00_000000_000003_leftImg8bit.png").unlink()
    out = tmp_path / "out" / "drive.mp4"
    result = CliRunner().invoke(citytrain, ["predict", "--checkpoint", str(unet_checkpoint),
                                            "--input", str(broken), "--video", str(out),
                                            "--device", "cpu"])
    assert result.exit_code != 0
    assert "stuttgart_00_000000_000003_leftImg8bit.png: frame missing from sequence " \
           "stuttgart_00_000000 (5 of frames 1-6 present)" in result.output
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_a_truncated_video_is_named_and_nothing_written(unet_checkpoint, drive, tmp_path):
    # moov at the end (as written here): a cut file has no index at all
    whole = tmp_path / "whole.mp4"
    predict_video(unet_checkpoint, drive, whole)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    # moov first ("faststart", as streaming sites write): the index promises frames that are gone
    fast = tmp_path / "fast.mp4"
    with av.open(str(fast), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=17)
        stream.width, stream.height, stream.pix_fmt = 128, 64, "yuv420p"
        noise = np.random.default_rng(0)
        for _ in range(20):
            image = noise.integers(0, 256, (64, 128, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    fast_cut = tmp_path / "fast_cut.mp4"
    fast_cut.write_bytes(fast.read_bytes()[: fast.stat().st_size // 2])
    for source, message in ((cut, "cut.mp4: cannot read video"),
                            (fast_cut, "fast_cut.mp4: damaged or truncated video after frame")):
        out = tmp_path / "out" / f"{source.stem}-pred.mp4"
        result = CliRunner().invoke(citytrain, ["predict", "--checkpoint", str(unet_checkpoint),
                                                "--input", str(source), "--video", str(out),
                                                "--device", "cpu"])
        assert result.exit_code != 0 and message in result.output, result.output
        assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_not_a_sequence(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="notes.txt: not a frame sequence"):
        open_frames(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no frames in this folder"):
        open_frames(tmp_path)
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(InputError, match="bad.zip: not a readable zip"):
        open_frames(tmp_path / "bad.zip")
