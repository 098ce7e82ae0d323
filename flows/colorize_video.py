"""``colorize video``: a video through the champion, frame by frame, with temporally stable colour.

Frames are decoded with PyAV (FFmpeg inside the wheel: any format FFmpeg reads), go through the network
in batches at its own size, the predicted ab is stabilized over time (model.temporal; ``--temporal off``
gives plain per-frame output), and each frame keeps its own full-resolution L (model.inference.compose,
the one inference pipeline). Memory is bounded by the batch, not the video's length.

Long videos are done in chunks of ``--chunk`` frames. Each finished chunk is an H.264 file renamed into
place in ``.<output>.parts/`` with the stabilizer's memory at its end; a killed run, rerun with the same
command, decodes past the finished chunks, restores that memory and goes on, so the output is the same
as an uninterrupted run's. The chunks are keyed by the input, the settings and the model the run
resolved to (registry version and weights digest, or a stage folder's file digest), so a moved alias
starts afresh instead of mixing two models. The chunks are then joined by stream copy, each frame at its
own input timestamp (variable frame rate keeps audio sync), with the input's audio copied alongside,
into a temporary file renamed to the output. One run at a time per output (a lock beside the parts).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.inference import compose, predict
from model.loading import NoModel, Running, load_engine, registry_version
from model.temporal import Stabilizer
from storage.atomic import atomic_path, temp_name, write_json
from storage.errors import ConfigError
from storage.fetch import file_digest

log = logging.getLogger(__name__)

CODEC = "libx264"
CRF = "16"
# Output extensions whose container holds H.264, each frame's own timestamp and copied audio; each is
# written in tests/test_video.py. Not AVI: it has no per-frame timestamps, and its muxer refuses them.
FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov"}


class VideoError(ConfigError):
    """The input cannot be read as a video, has no frames, or the output cannot be written: one line,
    exit 2."""


def probe(src: Path) -> dict[str, Any]:
    """Frame rate, size, time base, frame count and duration (when the container says) and audio streams
    of a video, or a VideoError saying why it is not one."""
    import av

    if not src.is_file():
        raise VideoError(f"{src}: no such file")
    try:
        with av.open(str(src)) as container:
            if not container.streams.video:
                raise VideoError(f"{src}: has no video stream")
            stream = _video_stream(container)
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoError(f"{src}: no frame rate")
            return {
                "rate": Fraction(rate),
                "width": stream.codec_context.width,
                "height": stream.codec_context.height,
                "frames": stream.frames or None,
                "duration": _declared_seconds(stream),
                "index": stream.index,
                "time_base": Fraction(stream.time_base or Fraction(1, 90000)),
                "audio": len(container.streams.audio),
                "audio_streams": [s.index for s in container.streams.audio],
            }
    except av.EOFError:  # a header and no frames: FFmpeg finds nothing to decode
        raise VideoError(f"{src}: the video has no frames") from None
    except av.FFmpegError as exc:
        raise VideoError(f"{src}: not a video FFmpeg can read ({exc.strerror or type(exc).__name__})") from None


def _video_stream(container: Any) -> Any:
    """The main picture: FFmpeg's best video stream (not a cover image), whatever the streams' order."""
    try:
        return container.streams.best("video") or container.streams.video[0]
    except Exception:  # noqa: BLE001 - an older PyAV without best(): the first video stream
        return container.streams.video[0]


def _declared_seconds(stream: Any) -> float | None:
    """How long the container says the video stream is (None when it does not say): the stream's own
    duration or Matroska's DURATION tag. Not the file's duration: the audio may rightly run longer, and
    some formats only estimate it from the bit rate."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION")
    if tag:
        with contextlib.suppress(ValueError):
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
    return None


def check_output(src: Path, dest: Path, info: dict[str, Any]) -> None:
    """Refuse an output that cannot be written, before any frame is decoded: an extension with no
    H.264 container, a folder, the input itself. Decides which audio streams the container can hold
    (``info["audio_keep"]``); the others are dropped with a warning."""
    import av

    if dest.is_dir():
        raise VideoError(f"{dest}: is a folder; give --out a file name such as {dest / (src.stem + '_color.mp4')}")
    fmt = FORMATS.get(dest.suffix.lower())
    if fmt is None:
        allowed = ", ".join(FORMATS)
        raise VideoError(f"{dest}: cannot write a {dest.suffix or 'no-extension'} video; end --out with {allowed}")
    if dest.resolve() == src.resolve():
        raise VideoError(f"{dest}: writing it would overwrite the input; choose another --out")
    if not _header_ok(fmt, info, []):
        raise VideoError(f"{dest}: the {fmt} container cannot hold H.264 video; end --out with .mp4 or .mkv")
    keep = []
    with av.open(str(src)) as container:
        for index in info["audio_streams"]:
            stream = container.streams[index]
            if _header_ok(fmt, info, [stream]):
                keep.append(index)
            else:
                log.warning(
                    "dropping audio stream #%d (%s): %s cannot hold it; use .mkv to keep it",
                    index,
                    stream.codec_context.name,
                    dest.suffix,
                )
    info["audio_keep"] = keep


def _header_ok(fmt: str, info: dict[str, Any], audio: list[Any]) -> bool:
    """Whether ``fmt`` accepts H.264 at this size plus these audio streams (a header written to memory)."""
    import av

    try:
        out = av.open(io.BytesIO(), mode="w", format=fmt)
    except (av.FFmpegError, ValueError):
        return False
    try:
        video = out.add_stream(CODEC, rate=info["rate"])
        video.width, video.height = info["width"], info["height"]
        video.pix_fmt = "yuv420p" if info["width"] % 2 == 0 and info["height"] % 2 == 0 else "yuv444p"
        for stream in audio:
            out.add_stream_from_template(stream)
        out.start_encoding()
        return True
    except (av.FFmpegError, ValueError):
        return False
    finally:
        with contextlib.suppress(Exception):
            out.close()


def frames(src: Path) -> Iterator[np.ndarray]:
    """Every frame as uint8 RGB (H, W, 3), in order."""
    for rgb, _ in timed_frames(src):
        yield rgb


def timed_frames(
    src: Path, info: dict[str, Any] | None = None, report: dict[str, int] | None = None
) -> Iterator[tuple[np.ndarray, int]]:
    """Every frame as (uint8 RGB (H, W, 3), its pts in the video stream's time base), in order. A packet
    that does not decode is skipped and counted in ``report["undecodable"]``; a frame of another size
    than the first is refused (the output has one size)."""
    import av

    info = info or probe(src)
    report = report if report is not None else {}
    report.setdefault("undecodable", 0)
    step = max(1, round(1 / (info["rate"] * info["time_base"])))  # one frame's duration, for missing pts
    last, count = None, 0
    with av.open(str(src)) as container:
        stream = container.streams[info["index"]]
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.FFmpegError:
                report["undecodable"] += 1
                continue
            for frame in decoded:
                if (frame.width, frame.height) != (info["width"], info["height"]):
                    raise VideoError(
                        f"{src}: the frame size changes from {info['width']}x{info['height']} to "
                        f"{frame.width}x{frame.height} at frame {count + 1}; "
                        "this command keeps one size: cut the video there and colorize each part"
                    )
                count += 1
                pts = frame.pts if frame.pts is not None else (0 if last is None else last + step)
                if last is not None and pts <= last:  # timestamps must increase in the output
                    pts = last + 1
                last = pts
                yield frame.to_ndarray(format="rgb24"), pts


def _chunk_writer(path: Path, info: dict[str, Any]) -> tuple[Any, Any]:
    import av

    container = av.open(str(path), mode="w", format="matroska")
    stream = container.add_stream(CODEC, rate=info["rate"])
    stream.width, stream.height = info["width"], info["height"]
    even = info["width"] % 2 == 0 and info["height"] % 2 == 0
    stream.pix_fmt = "yuv420p" if even else "yuv444p"
    stream.codec_context.max_b_frames = 0  # one packet per frame, in frame order: the join gives each its pts
    stream.options = {"crf": CRF, "preset": "medium"}
    return container, stream


@contextlib.contextmanager
def _exclusive(lock: Path, dest: Path) -> Iterator[None]:
    """Hold an flock on ``lock`` (as storage/stage.py does) for one run, or refuse: two runs writing one
    output would delete and mix each other's chunks. The lock file is removed at the end; a run that
    opened it just before then finds another file under the name and tries again."""
    for _ in range(5):
        try:
            fh = open(lock, "a+")  # noqa: SIM115 - held for the whole run
        except OSError as exc:
            raise VideoError(f"{dest}: cannot write there ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise VideoError(
                f"{dest}: another `colorize video` is writing this output now; wait for it or choose another --out"
            ) from None
        with contextlib.suppress(OSError):
            if os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino:
                break
        fh.close()
    else:
        raise VideoError(f"{dest}: another `colorize video` is writing this output now; try again")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        fh.close()


def _files_digest(root: Path, names: list[str] | None = None) -> str:
    """sha256 over the files' relative names and bytes (all files under ``root`` when ``names`` is None)."""
    h = hashlib.sha256()
    paths = [root / n for n in names] if names is not None else sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + file_digest(path, "sha256").encode())
    return h.hexdigest()


def load_model(
    spec: str | None,
    workdir: Path,
    how: Running = Running(),  # noqa: B008 - frozen
    hinted: bool = False,
) -> tuple[Any, int, dict[str, Any]]:
    """(network, its input size, what it resolved to) for ``--model``, run ``how`` (``hinted``: on an
    engine that takes hints, model.loading.load_engine). The identity keys resumable chunks: a registry
    model is pinned to the version its alias names now, loaded as that version and identified by it and
    the digest of its artifact files; a stage folder by the digest of its files; a ``--vividness`` other
    than the model's own is part of it (other colours)."""
    net, size, identity = _load_model(spec, workdir, how, hinted)
    return net, size, identity if how.vividness is None else {**identity, "vividness": how.vividness}


def _load_model(spec: str | None, workdir: Path, how: Running, hinted: bool) -> tuple[Any, int, dict[str, Any]]:
    from model.choices import DEFAULT_MODEL
    from model.colorizer import MODEL_FILE, SPEC_FILE

    target = spec or DEFAULT_MODEL
    local = Path(target).expanduser()
    if local.is_dir() or local.suffix == ".pt":
        net, size = load_engine(spec, workdir, how, hinted)
        folder = (local if local.is_dir() else local.parent).resolve()
        return net, size, {"folder": str(folder), "digest": _files_digest(folder, [MODEL_FILE, SPEC_FILE])}
    pinned = registry_version(target, workdir)
    if pinned is None:
        net, size = load_engine(spec, workdir, how, hinted)  # its own message when there is no such model
        return net, size, {"model": target}
    name, version = pinned
    net, size = load_engine(f"models:/{name}/{version}", workdir, how, hinted)
    import mlflow

    try:
        where = mlflow.MlflowClient().get_model_version_download_uri(name, version)
        with tempfile.TemporaryDirectory(prefix="colorize-video-") as tmp:  # a copy: removed once hashed
            files = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=tmp))
            weights = files / "artifacts" if (files / "artifacts").is_dir() else files
            digest = _files_digest(weights)
    except Exception as exc:  # noqa: BLE001 - the model loaded, so its files should be readable
        raise NoModel(f"cannot read the files of models:/{name}/{version}: {str(exc).splitlines()[0]}") from None
    return net, size, {"model": f"models:/{name}", "version": version, "weights": digest}


class VideoColorizer:
    """One video run: the network, its input size, the stabilizer's settings, the chunking."""

    def __init__(self, net: Any, size: int, temporal: bool, batch: int = 8, chunk: int = 240) -> None:
        self.net, self.size, self.temporal, self.batch, self.chunk = net, size, temporal, batch, chunk

    def _identity(self, src: Path, model: Any) -> dict[str, Any]:
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

    def run(self, src: Path, dest: Path, model: Any = "", info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Colorize ``src`` into ``dest``; returns frame count, rate, size, how many chunks were reused and
        whether an existing file was replaced. ``model`` is what the network resolved to (load_model)."""
        if info is None or "audio_keep" not in info:
            info = probe(src)
            check_output(src, dest, info)
        parts = dest.parent / f".{dest.name}.parts"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VideoError(f"{dest}: cannot write there ({exc.strerror or exc})") from None
        with _exclusive(parts.with_name(parts.name + ".lock"), dest):
            replaced = dest.is_file()
            self._prepare(parts, dest, self._identity(src, model))
            stats = self._colorize(src, dest, parts, info)
        return {**stats, "replaced": replaced}

    def _prepare(self, parts: Path, dest: Path, identity: dict[str, Any]) -> None:
        """Keep the finished chunks only if ``plan.json`` says they came from this input, these settings
        and this model; otherwise (or if it is unreadable) start afresh, and say why."""
        plan = parts / "plan.json"
        try:
            parts.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VideoError(f"{dest}: cannot write there ({exc.strerror or exc})") from None
        try:
            old = json.loads(plan.read_text())
        except FileNotFoundError:
            old = None
        except (OSError, ValueError):
            old = []
        if old is not None and not isinstance(old, dict):  # empty, cut short or hand-edited
            log.warning("%s: unreadable; starting %s afresh", plan, dest.name)
            old = {}
        if old != identity:
            if isinstance(old, dict) and old:
                changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                if "model" in changed:
                    log.warning(
                        "%s: the model is not the one the unfinished run used (%s, now %s); starting afresh",
                        dest.name,
                        _describe(old.get("model")),
                        _describe(identity.get("model")),
                    )
                else:
                    log.warning("%s: the unfinished run had another %s; starting afresh", dest.name, ", ".join(changed))
            shutil.rmtree(parts)  # another input, settings or model: nothing there can be reused
            parts.mkdir(parents=True)
            write_json(plan, identity)

    def _colorize(self, src: Path, dest: Path, parts: Path, info: dict[str, Any]) -> dict[str, Any]:
        stabilizer = Stabilizer() if self.temporal else None
        n, reused, index, pending, pts, report = 0, 0, 0, [], [], {"undecodable": 0}
        with tqdm(total=info["frames"], unit="frame", desc="colorize video", dynamic_ncols=True) as bar:
            for rgb, stamp in timed_frames(src, info, report):  # closed before an error's line is printed
                pending.append(rgb)
                pts.append(stamp)
                if len(pending) == self.chunk:
                    reused += self._chunk(parts, index, pending, stabilizer, info, bar)
                    n, index, pending = n + len(pending), index + 1, []
            if pending:
                reused += self._chunk(parts, index, pending, stabilizer, info, bar)
                n, index = n + len(pending), index + 1
        if n == 0:
            raise VideoError(f"{src}: the video has no frames")
        _warn_if_short(src, n, pts, info, report["undecodable"])
        _join(parts, index, self.chunk, pts, src, dest, info)
        shutil.rmtree(parts, ignore_errors=True)
        size = [info["width"], info["height"]]
        return {"frames": n, "rate": str(info["rate"]), "size": size, "chunks_reused": reused}

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


def _describe(model: Any) -> str:
    """A model identity (load_model) in a few words, for the log."""
    if not isinstance(model, dict):
        return str(model)
    if "version" in model:
        return f"{model['model']} version {model['version']}, weights {str(model.get('weights'))[:12]}"
    if "folder" in model:
        return f"{model['folder']}, files {str(model.get('digest'))[:12]}"
    return str(model.get("model"))


def _warn_if_short(src: Path, n: int, pts: list[int], info: dict[str, Any], undecodable: int) -> None:
    """One warning line when fewer frames came out than the container declares (a truncated or damaged
    file), so a short output is never silent."""
    bad = f"; {undecodable} packet(s) could not be decoded" if undecodable else ""
    if info["frames"] and n != info["frames"]:
        log.warning("%s: decoded %d frames, the container declares %d%s", src.name, n, info["frames"], bad)
        return
    declared, tb = info.get("duration"), info["time_base"]
    end = float((pts[-1] - pts[0]) * tb + 1 / info["rate"])  # the decoded frames' span
    if not info["frames"] and declared and declared - end > max(2 / info["rate"], 0.02 * declared):
        log.warning(
            "%s: decoded %d frames (%.2f s), the container declares %.2f s (about %d frames)%s",
            src.name,
            n,
            end,
            declared,
            round(declared * info["rate"]),
            bad,
        )
    elif bad:
        log.warning("%s: decoded %d frames%s", src.name, n, bad)


def _av_frame(rgb: np.ndarray, stream: Any) -> Any:
    import av

    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=stream.pix_fmt)


def _join(parts: Path, chunks: int, chunk: int, pts: list[int], src: Path, dest: Path, info: dict[str, Any]) -> None:
    """The chunks' video packets one after the other (stream copy), each frame at its own input
    timestamp, plus the input's kept audio streams copied, into a temporary file renamed to ``dest``."""
    import av

    tmp = temp_name(dest)
    tb = info["time_base"]
    step = max(1, round(1 / (info["rate"] * tb)))  # the last frame lasts one frame at the average rate
    try:
        with av.open(str(parts / "chunk-00000.mkv")) as first, av.open(str(tmp), mode="w", format=_format(dest)) as out:
            video = out.add_stream_from_template(first.streams.video[0])
            video.time_base = tb
            keep = info.get("audio_keep", info["audio_streams"])
            audio_in = av.open(str(src)) if keep else None
            audio_out = {i: out.add_stream_from_template(audio_in.streams[i]) for i in keep} if audio_in else {}
            j = 0
            for i in range(chunks):
                with av.open(str(parts / f"chunk-{i:05d}.mkv")) as part:
                    for packet in part.demux(part.streams.video[0]):
                        if packet.dts is None:
                            continue
                        if j >= min(len(pts), (i + 1) * chunk):
                            raise VideoError(f"{parts}: chunk {i} has more frames than decoded; delete it and rerun")
                        packet.time_base = tb
                        packet.pts = packet.dts = pts[j]
                        packet.duration = pts[j + 1] - pts[j] if j + 1 < len(pts) else step
                        packet.stream = video
                        out.mux(packet)
                        j += 1
            if audio_in is not None:
                with audio_in:
                    for packet in audio_in.demux(*[audio_in.streams[i] for i in keep]):
                        if packet.dts is None:
                            continue
                        packet.stream = audio_out[packet.stream.index]
                        out.mux(packet)
        tmp.replace(dest)
    except av.FFmpegError as exc:
        raise VideoError(f"{dest}: cannot write this video ({exc.strerror or type(exc).__name__})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _format(dest: Path) -> str:
    return FORMATS.get(dest.suffix.lower(), "mp4")
