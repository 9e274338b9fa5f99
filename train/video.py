"""`citytrain predict --input SEQUENCE --video out.mp4`: a drive as a colorized video.

Where the frames come from (`open_frames`):
- a folder or an official zip (`leftImg8bit_demoVideo.zip`, `leftImg8bit_sequence_trainvaltest.zip`)
  of Cityscapes frames `{city}_{seq:06d}_{frame:06d}_leftImg8bit.png` in any layout below it
  (`leftImg8bit/demoVideo/stuttgart_00/`, `leftImg8bit_sequence/{split}/{city}/`): ordered by
  city, sequence and frame number; a frame missing inside a sequence is an error naming the
  file that should be there. PNG frames carry no rate: 17 frames a second, the rate the
  Cityscapes camera records at, unless --fps says otherwise.
- a folder of other images: in natural name order (frame_2 before frame_10).
- a video file (anything FFmpeg reads, through PyAV): its frames at its own rate; a file that
  stops before the frame count its header announces is named as truncated.

Each frame is predicted as `citytrain predict` predicts a still (train/predict.py:
predict_image), so a frame of the video and the overlay PNG of the same image agree. The MP4
is H.264 in yuv420p, which every player shows (odd sizes get one edge row or column more),
encoded by the FFmpeg inside PyAV's wheel, under a temporary name renamed after the last
frame: a failure leaves nothing behind. `every` keeps every Nth frame and divides the rate by
N, so the video still lasts as long as the drive.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.archives import Member
from pipeline.cityscapes import IMAGE_RE, Source
from pipeline.files import tmp_path_for
from pipeline.labels import colorize
from pipeline.pngs import read_image
from train.onnx_runtime import require
from train.predict import IMAGE_SUFFIXES, InputError, load_rgb, predict_image
from train.visualize import overlay

CITYSCAPES_FPS = Fraction(17)  # the dataset's camera: 17 Hz (30-frame snippets are 1.8 s)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm")
LAYOUTS = ("overlay", "side-by-side")


@dataclass
class ImageSequence:
    """Frames as image files, in order: (name, file) each, a path or a zip member."""

    where: str
    files: list[tuple[str, Source]]
    fps: Fraction = CITYSCAPES_FPS

    @property
    def count(self) -> int:
        return len(self.files)

    def frames(self, every: int = 1) -> Iterator[tuple[str, np.ndarray]]:
        for name, src in self.files[::every]:  # the others are never read
            image = read_image(src) if IMAGE_RE.match(src.name) else load_rgb(src)
            yield name, image


@dataclass
class VideoFile:
    """A video container's first video stream, decoded to RGB frames by PyAV."""

    path: Path
    fps: Fraction
    count: int | None  # what the header announces; None when it does not say

    @property
    def where(self) -> str:
        return str(self.path)

    def frames(self, every: int = 1) -> Iterator[tuple[str, np.ndarray]]:
        av = require("av")
        n = 0
        with _open_video(self.path) as container:
            try:
                for frame in container.decode(container.streams.video[0]):
                    if n % every == 0:
                        yield f"{self.path.stem}_{n:06d}", frame.to_ndarray(format="rgb24")
                    n += 1
            except av.error.FFmpegError as e:
                raise InputError(f"{self.path}: damaged or truncated video after frame {n} "
                                 f"({e.strerror or e})") from None
        if self.count and n < self.count:
            raise InputError(f"{self.path}: truncated video: {n} of the {self.count} frames "
                             "its header announces")


def _open_video(path: Path):
    av = require("av")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise InputError(f"{path}: cannot read video ({e.strerror or e}: truncated, damaged or "
                         "not a video)") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: no video stream in this file")
    return container


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def order_frames(found: list[tuple[str, Source]], where: str) -> list[tuple[str, Source]]:
    """Cityscapes frames by (city, sequence, frame); InputError naming a frame missing inside a
    sequence, or a frame found twice."""
    groups: dict[tuple[str, str], dict[int, Source]] = {}
    for name, src in found:
        city, seq, frame = name.rsplit("_", 2)
        group = groups.setdefault((city, seq), {})
        if int(frame) in group:
            raise InputError(f"{src} and {group[int(frame)]}: frame {name} twice in {where}")
        group[int(frame)] = src
    ordered = []
    for (city, seq), frames in sorted(groups.items()):
        first, last = min(frames), max(frames)
        for k in range(first, last + 1):
            if k not in frames:
                src = frames[first].with_name(f"{city}_{seq}_{k:06d}_leftImg8bit.png")
                raise InputError(f"{src}: frame missing from sequence {city}_{seq} ("
                                 f"{len(frames)} of frames {first}-{last} present)")
            ordered.append((f"{city}_{seq}_{k:06d}", frames[k]))
    return ordered


def _from_folder(folder: Path) -> ImageSequence:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    frames = [(IMAGE_RE.match(p.name)["name"], p) for p in files if IMAGE_RE.match(p.name)]
    if frames:
        return ImageSequence(str(folder), order_frames(frames, str(folder)))
    images = sorted((p for p in files if p.suffix.lower() in IMAGE_SUFFIXES),
                    key=lambda p: _natural(p.relative_to(folder).as_posix()))
    if not images:
        raise InputError(f"{folder}: no frames in this folder (Cityscapes *_leftImg8bit.png or "
                         f"other {'/'.join(IMAGE_SUFFIXES)} images)")
    return ImageSequence(str(folder), [(p.stem, p) for p in images])


def _from_zip(path: Path) -> ImageSequence:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path}: not a readable zip ({e}); the download is incomplete or "
                         "corrupt, download it again") from None
    frames = [(m["name"], Member(path, n)) for n in names
              if (m := IMAGE_RE.match(n.rsplit("/", 1)[-1]))]
    if not frames:
        raise InputError(f"{path}: no Cityscapes *_leftImg8bit.png frames in this zip")
    return ImageSequence(str(path), order_frames(frames, str(path)))


def _from_video(path: Path) -> VideoFile:
    with _open_video(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise InputError(f"{path}: the video does not say its frame rate; pass --fps")
        return VideoFile(path, Fraction(rate), int(stream.frames) or None)


def open_frames(source: Path) -> ImageSequence | VideoFile:
    """The frame sequence at `source`: a folder, a zip of frames or a video file."""
    source = Path(source)
    if source.is_dir():
        return _from_folder(source)
    if not source.is_file():
        raise InputError(f"{source}: no such file or folder")
    if source.suffix.lower() == ".zip":
        return _from_zip(source)
    if source.suffix.lower() in VIDEO_SUFFIXES:
        return _from_video(source)
    raise InputError(f"{source}: not a frame sequence: pass a folder or zip of frames, or a "
                     f"{'/'.join(VIDEO_SUFFIXES)} video")


class VideoWriter:
    """An H.264 MP4 written frame by frame under a temporary name; renamed on a clean exit
    of the `with` block, removed on any exception. The size is the first frame's."""

    def __init__(self, path: Path, fps: Fraction, crf: int = 18) -> None:
        self.av = require("av")
        self.path, self.fps, self.crf = Path(path), Fraction(fps), crf
        self.tmp = tmp_path_for(self.path)
        self.container = self.stream = None
        self.frames = 0

    def __enter__(self) -> VideoWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = self.av.open(str(self.tmp), "w", format="mp4")
        return self

    def write(self, rgb: np.ndarray) -> None:
        # yuv420p halves the chroma in both directions, so libx264 needs even sizes
        rgb = np.pad(rgb, ((0, rgb.shape[0] % 2), (0, rgb.shape[1] % 2), (0, 0)), mode="edge")
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.height, self.stream.width = rgb.shape[:2]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": str(self.crf)}
        elif rgb.shape[:2] != (self.stream.height, self.stream.width):
            raise InputError(f"{self.path}: frame {self.frames} is {rgb.shape[1]}x"
                             f"{rgb.shape[0]}, the video {self.stream.width}x"
                             f"{self.stream.height}: a sequence's frames share one size")
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def __exit__(self, kind, value, traceback) -> None:
        done = False
        try:
            if kind is None:
                if self.stream is None:
                    raise InputError(f"{self.path}: no frame to write")
                self.container.mux(self.stream.encode(None))  # the frames still in the encoder
                self.container.close()
                os.replace(self.tmp, self.path)
                done = True
        finally:
            if not done:
                with contextlib.suppress(Exception):  # the error that brought us here counts
                    self.container.close()
                self.tmp.unlink(missing_ok=True)


def compose(image: np.ndarray, mask: np.ndarray, layout: str) -> np.ndarray:
    """One video frame: the overlay, or image | colorized prediction side by side."""
    if layout == "overlay":
        return overlay(image, mask)
    return np.concatenate([image, mask], axis=1)


def predict_video(model, source: Path, out: Path, *, mean, std, loss, device="cpu",
                  size: tuple[int, int] | None = None, inference=None, amp: str = "off",
                  every: int = 1, layout: str = "overlay", fps: float | None = None,
                  progress: bool = True) -> dict:
    """Predict every `every`-th frame of `source` and write the video `out`; returns what was
    written (frames, fps, size). Arguments as train.predict.predict_paths."""
    from pipeline.progress import bar

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    frames = open_frames(source)
    rate = (Fraction(fps).limit_denominator(1001) if fps else frames.fps) / every
    total = None if frames.count is None else math.ceil(frames.count / every)
    was_training = model.training
    model.eval()
    try:
        with VideoWriter(out, rate) as writer:
            for _, image in bar(frames.frames(every), total=total, desc="predict",
                                 unit="frame", disable=not progress):
                pred = predict_image(model, image, mean=mean, std=std, loss=loss, device=device,
                                     size=size, inference=inference, amp=amp)
                writer.write(compose(image, colorize(pred, loss.palette), layout))
    finally:
        model.train(was_training)
    return {"frames": writer.frames, "fps": rate, "source": frames.where,
            "size": [writer.stream.width, writer.stream.height]}
