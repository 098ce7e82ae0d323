"""``colorize video``: a video through the champion, frame by frame, with temporally stable colour.

Frames are decoded with PyAV (FFmpeg inside the wheel: any format FFmpeg reads), go through the network
in batches at its own size, the predicted ab is stabilized over time (model.temporal; ``--temporal off``
gives plain per-frame output), and each frame keeps its own full-resolution L (model.inference.compose,
the one inference pipeline). Memory is bounded by the batch, not the video's length.

Long videos are done in chunks of ``--chunk`` frames. Each finished chunk is an H.264 file renamed into
place in ``.<output>.parts/`` with the stabilizer's memory at its end; a killed run, rerun with the same
command, decodes past the finished chunks, restores that memory and goes on, so the output is the same
as an uninterrupted run's. The chunks are then joined by stream copy, with the input's audio copied
alongside, into a temporary file renamed to the output. Frame rate, size and audio are kept.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.inference import compose, predict
from model.temporal import Stabilizer
from storage.atomic import atomic_path, temp_name, write_json

CODEC = "libx264"
CRF = "16"


class VideoError(Exception):
    """The input cannot be read as a video, has no frames, or the output cannot be written: one line."""


def probe(src: Path) -> dict[str, Any]:
    """Frame rate, size, frame count (when the container says) and audio streams of a video, or a
    VideoError saying why it is not one."""
    import av

    if not src.is_file():
        raise VideoError(f"{src}: no such file")
    try:
        with av.open(str(src)) as container:
            if not container.streams.video:
                raise VideoError(f"{src}: has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoError(f"{src}: no frame rate")
            return {
                "rate": Fraction(rate),
                "width": stream.codec_context.width,
                "height": stream.codec_context.height,
                "frames": stream.frames or None,
                "audio": len(container.streams.audio),
            }
    except av.EOFError:  # a header and no frames: FFmpeg finds nothing to decode
        raise VideoError(f"{src}: the video has no frames") from None
    except av.FFmpegError as exc:
        raise VideoError(f"{src}: not a video FFmpeg can read ({exc.strerror or type(exc).__name__})") from None


def frames(src: Path) -> Iterator[np.ndarray]:
    """Every frame as uint8 RGB (H, W, 3), in order."""
    import av

    with av.open(str(src)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def _chunk_writer(path: Path, info: dict[str, Any]) -> tuple[Any, Any]:
    import av

    container = av.open(str(path), mode="w", format="matroska")
    stream = container.add_stream(CODEC, rate=info["rate"])
    stream.width, stream.height = info["width"], info["height"]
    even = info["width"] % 2 == 0 and info["height"] % 2 == 0
    stream.pix_fmt = "yuv420p" if even else "yuv444p"
    stream.codec_context.max_b_frames = 0
    stream.options = {"crf": CRF, "preset": "medium"}
    return container, stream


class VideoColorizer:
    """One video run: the network, its input size, the stabilizer's settings, the chunking."""

    def __init__(self, net: Any, size: int, temporal: bool, batch: int = 8, chunk: int = 240) -> None:
        self.net, self.size, self.temporal, self.batch, self.chunk = net, size, temporal, batch, chunk

    def _identity(self, src: Path, model: str) -> dict[str, Any]:
        stat = src.stat()
        return {
            "input": str(src.resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
            "model": model,
            "engine": type(self.net).__name__,
            "size": self.size,
            "temporal": self.temporal,
            "chunk": self.chunk,
            "codec": [CODEC, CRF],
        }

    def colorize_frames(self, rgbs: list[np.ndarray], stabilizer: Stabilizer | None) -> Iterator[np.ndarray]:
        """One batch of consecutive frames -> their colour versions, the stabilizer (if any) carrying its
        memory from the previous batch."""
        l_norm, ab = predict(self.net, rgbs, self.size)
        for rgb, light, ab_small in zip(rgbs, l_norm, ab, strict=True):
            if stabilizer is not None:
                ab_small = torch.from_numpy(stabilizer(light[0].numpy(), ab_small.numpy()))
            yield compose(rgb, ab_small)

    def run(self, src: Path, dest: Path, model: str = "") -> dict[str, Any]:
        """Colorize ``src`` into ``dest``; returns frame count, rate, size and how many chunks were reused."""
        info = probe(src)
        if dest.resolve() == src.resolve():
            raise VideoError(f"{dest}: writing it would overwrite the input; choose another --out")
        parts = dest.parent / f".{dest.name}.parts"
        try:
            parts.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VideoError(f"{dest}: cannot write there ({exc.strerror or exc})") from None
        identity = self._identity(src, model)
        plan = parts / "plan.json"
        if not plan.is_file() or json.loads(plan.read_text()) != identity:
            shutil.rmtree(parts)  # another input or other settings: nothing there can be reused
            parts.mkdir(parents=True)
            write_json(plan, identity)
        stabilizer = Stabilizer() if self.temporal else None
        n, reused, index, pending = 0, 0, 0, []
        bar = tqdm(total=info["frames"], unit="frame", desc="colorize video", dynamic_ncols=True)
        for rgb in frames(src):
            pending.append(rgb)
            if len(pending) == self.chunk:
                reused += self._chunk(parts, index, pending, stabilizer, info, bar)
                n, index, pending = n + len(pending), index + 1, []
        if pending:
            reused += self._chunk(parts, index, pending, stabilizer, info, bar)
            n, index = n + len(pending), index + 1
        bar.close()
        if n == 0:
            raise VideoError(f"{src}: the video has no frames")
        _join(parts, index, src, dest, info)
        shutil.rmtree(parts, ignore_errors=True)
        return {
            "frames": n,
            "rate": str(info["rate"]),
            "size": [info["width"], info["height"]],
            "chunks_reused": reused,
        }

    def _chunk(
        self, parts: Path, index: int, rgbs: list[np.ndarray], stabilizer: Stabilizer | None, info: dict, bar: Any
    ) -> int:
        """Encode one chunk (or reuse the finished one); returns 1 if reused."""
        video, state = parts / f"chunk-{index:05d}.mkv", parts / f"state-{index:05d}.npz"
        if video.is_file() and state.is_file():
            if stabilizer is not None:
                with np.load(state) as saved:
                    stabilizer.restore({k: saved[k] for k in saved.files})
            bar.update(len(rgbs))
            return 1
        tmp = temp_name(video)
        container, stream = _chunk_writer(tmp, info)
        try:
            for start in range(0, len(rgbs), self.batch):
                for out in self.colorize_frames(rgbs[start : start + self.batch], stabilizer):
                    frame = _av_frame(out, stream)
                    for packet in stream.encode(frame):
                        container.mux(packet)
                    bar.update(1)
            for packet in stream.encode():
                container.mux(packet)
            container.close()
            with atomic_path(state) as tmp_state, open(tmp_state, "wb") as fh:
                np.savez(fh, **(stabilizer.state() if stabilizer is not None else {}))
            tmp.replace(video)  # the chunk counts as finished only with its state beside it
        finally:
            tmp.unlink(missing_ok=True)
        return 0


def _av_frame(rgb: np.ndarray, stream: Any) -> Any:
    import av

    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=stream.pix_fmt)


def _join(parts: Path, chunks: int, src: Path, dest: Path, info: dict[str, Any]) -> None:
    """The chunks' video packets one after the other (stream copy, timestamps shifted), plus the
    input's audio packets copied, into a temporary file renamed to ``dest``."""
    import av

    tmp = temp_name(dest)
    try:
        with av.open(str(parts / "chunk-00000.mkv")) as first, av.open(str(tmp), mode="w", format=_format(dest)) as out:
            video = out.add_stream_from_template(first.streams.video[0])
            audio_in = av.open(str(src)) if info["audio"] else None
            audio_out = [out.add_stream_from_template(s) for s in audio_in.streams.audio] if audio_in else []
            offset_s = Fraction(0)
            for i in range(chunks):
                with av.open(str(parts / f"chunk-{i:05d}.mkv")) as part:
                    stream = part.streams.video[0]
                    count = 0
                    for packet in part.demux(stream):
                        if packet.dts is None:
                            continue
                        shift = round(offset_s / packet.time_base)
                        packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                        packet.stream = video
                        out.mux(packet)
                        count += 1
                    offset_s += Fraction(count) / info["rate"]
            if audio_in is not None:
                with audio_in:
                    for packet in audio_in.demux(*audio_in.streams.audio):
                        if packet.dts is None:
                            continue
                        packet.stream = audio_out[packet.stream.index - audio_in.streams.audio[0].index]
                        out.mux(packet)
        tmp.replace(dest)
    except av.FFmpegError as exc:
        raise VideoError(f"{dest}: cannot write this video ({exc.strerror or type(exc).__name__})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _format(dest: Path) -> str:
    return {".mkv": "matroska", ".mov": "mov", ".avi": "avi", ".webm": "webm"}.get(dest.suffix.lower(), "mp4")
