"""`colorize video`: what a video keeps (frames, rate, size, audio), resuming a killed run, the temporal
stabilizer against flicker on a pan with known motion, and bad inputs."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import av
import numpy as np
import pytest
from skimage import color, data

from flows.cli import main
from flows.colorize_video import VideoColorizer, probe
from model.colorizer import load_folder
from model.temporal import Stabilizer, to_gray8, warping_error


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pan(n: int, w: int = 64, h: int = 48, step: int = 3) -> list[np.ndarray]:
    """A camera panning right over a real photo, ``step`` pixels a frame."""
    img = data.astronaut()
    return [np.ascontiguousarray(img[100 : 100 + h, 100 + step * i : 100 + step * i + w]) for i in range(n)]


def make_clip(path: Path, n: int = 20, fps: int = 10, audio: bool = True) -> Path:
    out = av.open(str(path), "w")
    video = out.add_stream("libx264", rate=fps)
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    sound = out.add_stream("aac", rate=16000) if audio else None
    if sound is not None:
        sound.layout = "mono"
    for rgb in _pan(n):
        for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            out.mux(packet)
    for packet in video.encode():
        out.mux(packet)
    if sound is not None:
        t = np.arange(int(16000 * n / fps)) / 16000
        pcm = (0.3 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)[None]
        for s in range(0, pcm.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(pcm[:, s : s + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode():
            out.mux(packet)
    out.close()
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "pan.mp4")


def test_frames_rate_size_and_audio_are_kept(clip: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir), "--chunk", "8"]) == 0
    src, got = probe(clip), probe(out)
    assert (got["rate"], got["width"], got["height"], got["audio"]) == (src["rate"], 64, 48, 1)
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 20
        audio = c.streams.audio[0]
        assert audio.codec_context.name == "aac" and abs(float(audio.duration * audio.time_base) - 2.0) < 0.1
    assert not list(tmp_path.glob(".*parts*")) and not list(tmp_path.glob(".*tmp*"))


def test_a_killed_run_resumes_from_its_last_chunk_and_ends_identical(clip: Path, model_dir: Path, tmp_path: Path):
    net = load_folder(model_dir)
    straight = tmp_path / "a" / "out.mp4"
    VideoColorizer(net, 32, temporal=True, batch=3, chunk=8).run(clip, straight)

    resumed = tmp_path / "b" / "out.mp4"
    crashing = VideoColorizer(net, 32, temporal=True, batch=3, chunk=8)
    real = crashing._chunk

    def killed_in_second_chunk(parts, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return real(parts, index, *args)

    crashing._chunk = killed_in_second_chunk
    with pytest.raises(KeyboardInterrupt):
        crashing.run(clip, resumed)
    assert not resumed.exists() and len(list((tmp_path / "b" / ".out.mp4.parts").glob("chunk-*.mkv"))) == 1
    stats = VideoColorizer(net, 32, temporal=True, batch=3, chunk=8).run(clip, resumed)
    assert stats["chunks_reused"] == 1
    assert fingerprint(resumed) == fingerprint(straight)


def test_the_stabilizer_removes_flicker_on_a_pan_without_losing_accuracy() -> None:
    """Per-frame predictions = the true colour plus a different smooth colour cast each frame (flicker)."""
    rng = np.random.default_rng(0)
    frames = _pan(24)
    lab = [color.rgb2lab(f) for f in frames]
    truth = [np.ascontiguousarray(x[..., 1:].transpose(2, 0, 1) / 110).astype(np.float32) for x in lab]
    l_norm = [(x[..., 0] / 100).astype(np.float32) for x in lab]
    noisy = [t + rng.normal(0, 0.05, (2, 1, 1)).astype(np.float32) for t in truth]
    stab = Stabilizer()
    stable = [stab(light, ab) for light, ab in zip(l_norm, noisy, strict=True)]
    grays = [to_gray8(light) for light in l_norm]
    per_frame, stabilized = warping_error(grays, noisy), warping_error(grays, stable)
    assert stabilized < 0.5 * per_frame
    mse = lambda xs: float(np.mean([np.mean((x - t) ** 2) for x, t in zip(xs, truth, strict=True)]))  # noqa: E731
    assert mse(stable) <= 1.05 * mse(noisy)


def test_a_scene_cut_resets_the_colour_memory() -> None:
    stab = Stabilizer()
    a = np.zeros((2, 32, 32), np.float32)
    stab(np.full((32, 32), 0.2, np.float32), a + 0.5)
    other = np.random.default_rng(0).random((32, 32)).astype(np.float32)  # a different picture
    assert np.allclose(stab(other, a), a)  # nothing carried across the cut


def test_bad_inputs_are_one_line_errors(model_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.mp4").write_text("not a video")
    empty = tmp_path / "empty.mkv"
    with av.open(str(empty), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    clip = make_clip(tmp_path / "ok.mp4", n=4, audio=False)
    cases = [
        (tmp_path / "notes.mp4", tmp_path / "o.mp4", "not a video"),
        (empty, tmp_path / "o.mp4", "no frames"),
        (tmp_path / "missing.mp4", tmp_path / "o.mp4", "no such file"),
        (clip, Path("/proc/o.mp4"), "cannot write"),
        (clip, clip, "overwrite the input"),
    ]
    for src, out, message in cases:
        assert main(["video", str(src), "--out", str(out), "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err.strip().split("\r")[-1]
        assert message in err and len(err.splitlines()) == 1, err
