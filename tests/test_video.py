"""`colorize video`: what a video keeps (frames, rate, timestamps, size, audio), resuming a killed run (and
not resuming with another model), the temporal stabilizer against flicker on a pan with known motion, bad
inputs and outputs, and two runs on one output."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from skimage import color, data

import flows.colorize_video as colorize_video
from flows.cli import main
from flows.colorize_video import FORMATS, VideoColorizer, probe
from model.colorizer import Colorizer, ColorizerSpec, load_folder, save_trained
from model.temporal import Stabilizer, to_gray8, warping_error


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pan(n: int, w: int = 64, h: int = 48, step: int = 3) -> list[np.ndarray]:
    """A camera panning right over a real photo, ``step`` pixels a frame."""
    img = data.astronaut()
    return [np.ascontiguousarray(img[100 : 100 + h, 100 + step * i : 100 + step * i + w]) for i in range(n)]


def _tone(out: Any, sound: Any, seconds: float, chunk: int = 1024, fmt: str = "fltp") -> None:
    """A 440 Hz mono tone of ``seconds`` encoded into ``sound`` and muxed, ``chunk`` samples a frame."""
    rate = sound.codec_context.sample_rate
    t = np.arange(round(rate * seconds)) / rate
    pcm = (0.3 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)[None]
    for s in range(0, pcm.shape[1], chunk):
        frame = av.AudioFrame.from_ndarray(pcm[:, s : s + chunk], format=fmt, layout="mono")
        frame.sample_rate = rate
        for packet in sound.encode(frame):
            out.mux(packet)
    for packet in sound.encode():
        out.mux(packet)


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
        _tone(out, sound, n / fps)
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


def write_video(
    path: Path,
    stamps_ms: list[int],
    audio_s: float = 0.0,
    order: tuple[str, ...] = ("video", "audio"),
    audio_codec: str = "aac",
    size: tuple[int, int] = (64, 48),
) -> Path:
    """A clip whose frames are at the given times (ms; variable frame rate when uneven), with a 440 Hz tone
    of ``audio_s`` seconds in each "audio" of ``order`` (the streams are added in that order)."""
    out = av.open(str(path), "w")
    video, sounds = None, []
    for kind in order:
        if kind == "video":
            video = out.add_stream("libx264", rate=25)
            video.width, video.height, video.pix_fmt = *size, "yuv420p"
            video.codec_context.time_base = video.time_base = Fraction(1, 1000)
        else:
            sound = out.add_stream(audio_codec, rate=48000 if audio_codec == "libopus" else 16000)
            sound.layout = "mono"
            sounds.append(sound)
    for rgb, ms in zip(_pan(len(stamps_ms), *size), stamps_ms, strict=True):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = ms, Fraction(1, 1000)
        for packet in video.encode(frame):
            out.mux(packet)
    for packet in video.encode():
        out.mux(packet)
    for sound in sounds:
        _tone(out, sound, audio_s, chunk=960, fmt="flt" if audio_codec == "libopus" else "fltp")
    out.close()
    return path


def _frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as c:
        return [float(f.pts * f.time_base) for f in c.decode(video=0)]


def _audio_seconds(path: Path) -> list[float]:
    """How long each audio stream lasts, from its packets (Matroska does not declare it per stream)."""
    with av.open(str(path)) as c:
        indexes = [s.index for s in c.streams.audio]
    seconds = []
    for index in indexes:
        with av.open(str(path)) as c:
            packets = [p for p in c.demux(c.streams[index]) if p.pts is not None]
            seconds.append(float(max((p.pts + p.duration) * p.time_base for p in packets)))
    return seconds


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _untrained(folder: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    save_trained(Colorizer(ColorizerSpec(decoder_width=8, image_size=32)).eval(), folder)
    return folder


def _killed_in_second_chunk(monkeypatch, argv: list[str]) -> None:
    """Run ``colorize ARGV`` and interrupt it as it starts its second chunk (exit 130, one chunk kept)."""
    real = VideoColorizer._chunk

    def killed(self, parts, index, *rest):
        if index == 1:
            raise KeyboardInterrupt
        return real(self, parts, index, *rest)

    monkeypatch.setattr(VideoColorizer, "_chunk", killed)
    assert main(argv) == 130
    monkeypatch.setattr(VideoColorizer, "_chunk", real)


def test_a_resumed_run_with_another_model_starts_afresh(tmp_path: Path, caplog, monkeypatch) -> None:
    """Killed mid-way, the model replaced (a retrain), the same command rerun: every frame comes from the
    new model (identical to a straight run with it), and the log says why nothing was reused."""
    clip = make_clip(tmp_path / "pan.mp4", n=12, audio=False)
    model = _untrained(tmp_path / "model", seed=0)
    args = ["video", str(clip), "--model", str(model), "--chunk", "4", "--batch", "4"]
    _killed_in_second_chunk(monkeypatch, [*args, "--out", str(tmp_path / "out.mp4")])
    _untrained(model, seed=1)  # the retrain: same folder, other weights
    caplog.clear()
    assert main([*args, "--out", str(tmp_path / "out.mp4")]) == 0
    assert any("model is not the one" in m for m in _warnings(caplog)), _warnings(caplog)
    assert main([*args, "--out", str(tmp_path / "straight.mp4")]) == 0
    assert fingerprint(tmp_path / "out.mp4") == fingerprint(tmp_path / "straight.mp4")


def test_a_resumed_run_after_the_champion_moved_starts_afresh(tmp_path: Path, model_dir: Path, caplog, monkeypatch):
    """Killed mid-way on champion version 1, a retrain moves the alias to version 2, the same command is
    rerun: nothing of version 1 is reused (the output equals a straight run with version 2), and it says so."""
    import mlflow

    from flows.env import configure
    from model import pyfunc
    from model.colorizer import MODEL_FILE, SPEC_FILE
    from storage.tracking import Tracker, tracking_uri

    workdir = tmp_path / "work"
    workdir.mkdir()
    configure(workdir)
    mlflow.set_tracking_uri(tracking_uri(workdir))
    mlflow.set_registry_uri(tracking_uri(workdir))
    experiment = Tracker(workdir).experiment_id()
    entry = tmp_path / "entry.py"
    entry.write_text(pyfunc.ENTRY)

    def register_champion(folder: Path) -> None:  # what tasks/register.py does, without the pipeline
        with mlflow.start_run(experiment_id=experiment):  # artifacts in the work dir, as the pipeline's
            artifacts = {"weights": str(folder / MODEL_FILE), "spec": str(folder / SPEC_FILE)}
            info = mlflow.pyfunc.log_model(name="colorizer", python_model=str(entry), artifacts=artifacts)
        version = mlflow.register_model(info.model_uri, "colorizer")
        mlflow.MlflowClient().set_registered_model_alias("colorizer", "champion", version.version)

    register_champion(model_dir)
    clip = make_clip(tmp_path / "pan.mp4", n=8, audio=False)
    args = ["video", str(clip), "--workdir", str(workdir), "--engine", "torch", "--chunk", "4", "--batch", "4"]
    _killed_in_second_chunk(monkeypatch, [*args, "--out", str(tmp_path / "out.mp4")])
    register_champion(_untrained(tmp_path / "retrained", seed=1))
    caplog.clear()
    assert main([*args, "--out", str(tmp_path / "out.mp4")]) == 0
    said = [m for m in _warnings(caplog) if "model is not the one" in m]
    assert len(said) == 1 and "models:/colorizer version 1" in said[0] and "version 2" in said[0], said
    assert main([*args, "--model", "models:/colorizer/2", "--out", str(tmp_path / "v2.mp4")]) == 0
    assert fingerprint(tmp_path / "out.mp4") == fingerprint(tmp_path / "v2.mp4")


def test_variable_frame_rate_keeps_each_frames_time_and_the_audio(model_dir: Path, tmp_path: Path) -> None:
    """Frames at 0-0.36 s and 10.0-10.36 s with 10.4 s of audio: the output's frames are at the same
    times (not evenly spaced), so the picture stays in sync with the sound."""
    stamps = [40 * i for i in range(10)] + [10000 + 40 * i for i in range(10)]
    clip = write_video(tmp_path / "vfr.mkv", stamps, audio_s=10.4)
    out = tmp_path / "out.mp4"
    assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir), "--chunk", "8"]) == 0
    assert np.allclose(_frame_times(out), np.array(stamps) / 1000, atol=0.002), _frame_times(out)
    assert abs(_audio_seconds(out)[0] - 10.4) < 0.1


def test_a_frame_size_change_is_refused_in_one_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    """Two H.264 streams of different sizes back to back (a raw .h264 file): refused, not squeezed."""
    raw = tmp_path / "two_sizes.h264"
    write_video(tmp_path / "a.h264", [40 * i for i in range(3)], audio_s=0, order=("video",))
    write_video(tmp_path / "b.h264", [40 * i for i in range(3)], audio_s=0, order=("video",), size=(32, 24))
    raw.write_bytes((tmp_path / "a.h264").read_bytes() + (tmp_path / "b.h264").read_bytes())
    assert main(["video", str(raw), "--out", str(tmp_path / "o.mp4"), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: ") and "frame size changes from 64x48 to 32x24 at frame 4" in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_a_truncated_file_says_how_many_frames_it_lost(model_dir: Path, tmp_path: Path, caplog) -> None:
    clip = make_clip(tmp_path / "pan.mkv", n=20)
    data = clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "out.mp4"
    assert main(["video", str(cut), "--out", str(out), "--model", str(model_dir)]) == 0
    decoded = len(_frame_times(out))
    assert decoded < 20
    lines = [m for m in _warnings(caplog) if "decoded" in m]
    assert len(lines) == 1 and f"decoded {decoded} frames" in lines[0] and "declares 2.00 s" in lines[0], lines


@pytest.mark.parametrize("name", ["e.png", "e.txt", "e.gif", "noext", "x.webm", "x.avi", "folder"])
def test_an_output_that_cannot_hold_the_video_is_refused_before_decoding(
    name: str, model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    (tmp_path / "folder").mkdir()
    clip = make_clip(tmp_path / "pan.mp4", n=4, audio=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the output was checked")

    monkeypatch.setattr(colorize_video, "timed_frames", no_decoding)
    assert main(["video", str(clip), "--out", str(tmp_path / name), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert ("is a folder" if name == "folder" else "end --out with .mp4, .mkv, .mov") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pan.mp4"]


def test_every_output_extension_in_help_writes_a_video_with_its_audio(model_dir: Path, tmp_path: Path, capsys) -> None:
    """--help lists exactly FORMATS, and each writes a playable video with the frames and the sound."""
    with pytest.raises(SystemExit):
        main(["video", "--help"])
    assert re.findall(r"\s(\.[a-z0-9]+)\b", capsys.readouterr().out) == list(FORMATS)
    clip = make_clip(tmp_path / "pan.mp4", n=6)
    for ext in FORMATS:
        out = tmp_path / f"out{ext}"
        assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir)]) == 0, ext
        assert len(_frame_times(out)) == 6 and abs(_audio_seconds(out)[0] - 0.6) < 0.15, ext


def test_streams_ordered_audio_video_audio_keep_both_audio_tracks(model_dir: Path, tmp_path: Path) -> None:
    clip = write_video(
        tmp_path / "ava.mkv", [100 * i for i in range(6)], audio_s=0.6, order=("audio", "video", "audio")
    )
    out = tmp_path / "out.mp4"
    assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir)]) == 0
    assert len(_frame_times(out)) == 6 and len(_audio_seconds(out)) == 2


def test_audio_the_output_cannot_hold_is_dropped_with_a_word(model_dir: Path, tmp_path: Path, caplog) -> None:
    clip = write_video(tmp_path / "opus.mkv", [100 * i for i in range(4)], audio_s=0.4, audio_codec="libopus")
    out = tmp_path / "out.mov"  # QuickTime has no Opus
    assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir)]) == 0
    assert len(_frame_times(out)) == 4 and _audio_seconds(out) == []
    assert any("dropping audio stream #1 (opus)" in m for m in _warnings(caplog)), _warnings(caplog)


def test_an_unreadable_plan_starts_afresh(model_dir: Path, tmp_path: Path, caplog) -> None:
    clip = make_clip(tmp_path / "pan.mp4", n=4, audio=False)
    out = tmp_path / "out.mp4"
    for junk in ("", "{not json", "[1, 2]"):
        parts = tmp_path / ".out.mp4.parts"
        parts.mkdir()
        (parts / "plan.json").write_text(junk)
        (parts / "chunk-00000.mkv").write_text("garbage from a crash")
        (parts / "state-00000.npz").write_text("garbage")
        caplog.clear()
        assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir)]) == 0, junk
        assert len(_frame_times(out)) == 4 and not parts.exists()
        assert any("afresh" in m for m in _warnings(caplog)), junk


def test_a_second_run_on_the_same_output_is_refused(model_dir: Path, tmp_path: Path, capsys) -> None:
    clip = make_clip(tmp_path / "pan.mp4", n=4, audio=False)
    out = tmp_path / "out.mp4"
    with open(tmp_path / ".out.mp4.parts.lock", "a+") as held:  # what a running `colorize video` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err.strip().split("\r")[-1]
        assert "another `colorize video` is writing this output" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir)]) == 0


def test_replacing_an_existing_output_is_said(model_dir: Path, tmp_path: Path, capsys) -> None:
    clip = make_clip(tmp_path / "pan.mp4", n=4, audio=False)
    out = tmp_path / "out.mp4"
    assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir)]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert main(["video", str(clip), "--out", str(out), "--model", str(model_dir)]) == 0
    assert "(replaced the existing file)" in capsys.readouterr().out


def test_the_vividness_reaches_every_frame_and_keys_the_resumable_chunks(
    tmp_path: Path, model_dir: Path, caplog, monkeypatch, capsys
) -> None:
    """A classification model's video at two vividness settings differs; a run killed at one and rerun
    at the other reuses nothing (its output equals a straight run); a regression model refuses one."""
    import torch

    from model import ab_bins

    clip = make_clip(tmp_path / "pan.mp4", n=8, audio=False)
    torch.manual_seed(0)
    spec = ColorizerSpec(decoder_width=8, image_size=32, head="classification", classes=len(ab_bins.bins()))
    save_trained(Colorizer(spec).eval(), tmp_path / "model")
    args = ["video", str(clip), "--model", str(tmp_path / "model"), "--chunk", "4", "--batch", "4"]
    _killed_in_second_chunk(monkeypatch, [*args, "--vividness", "0.05", "--out", str(tmp_path / "out.mp4")])
    caplog.clear()
    assert main([*args, "--vividness", "1", "--out", str(tmp_path / "out.mp4")]) == 0
    assert any("model is not the one" in m for m in _warnings(caplog)), _warnings(caplog)
    assert main([*args, "--vividness", "1", "--out", str(tmp_path / "mean.mp4")]) == 0
    assert main([*args, "--vividness", "0.05", "--out", str(tmp_path / "mode.mp4")]) == 0
    assert fingerprint(tmp_path / "out.mp4") == fingerprint(tmp_path / "mean.mp4")
    assert fingerprint(tmp_path / "mode.mp4") != fingerprint(tmp_path / "mean.mp4")

    capsys.readouterr()
    regression = ["video", str(clip), "--model", str(model_dir), "--out", str(tmp_path / "r.mp4")]
    assert main([*regression, "--vividness", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "regression head" in err and "\n" not in err and not (tmp_path / "r.mp4").exists()


def test_a_reference_palette_reaches_every_frame_and_keys_the_resumable_chunks(
    tmp_path: Path, model_dir: Path, caplog, monkeypatch, capsys
) -> None:
    """`colorize video --reference`: the same palette for every frame of a hinted model (local+global);
    a run killed with one reference and rerun with another reuses nothing (it equals a straight run); a
    model trained without hints, or a grey reference, is one line and exit 2 with nothing written."""
    import torch
    from PIL import Image

    clip = make_clip(tmp_path / "pan.mp4", n=8, audio=False)
    torch.manual_seed(0)
    net = Colorizer(ColorizerSpec(decoder_width=8, image_size=32, hints="local+global")).eval()
    with torch.no_grad():
        for p in net.hint_global.parameters():  # an untrained model's hint layers start at zero
            p.normal_(0, 500.0)  # large: an untrained decoder passes the bottleneck on only faintly
    save_trained(net, tmp_path / "model")
    green, red = tmp_path / "green.png", tmp_path / "red.png"
    Image.fromarray(np.full((32, 32, 3), (30, 160, 40), dtype=np.uint8)).save(green)
    Image.fromarray(np.full((32, 32, 3), (200, 30, 30), dtype=np.uint8)).save(red)
    args = ["video", str(clip), "--model", str(tmp_path / "model"), "--chunk", "4", "--batch", "4"]
    _killed_in_second_chunk(monkeypatch, [*args, "--reference", str(green), "--out", str(tmp_path / "out.mp4")])
    caplog.clear()
    assert main([*args, "--reference", str(red), "--out", str(tmp_path / "out.mp4")]) == 0
    assert any("model is not the one" in m for m in _warnings(caplog)), _warnings(caplog)
    assert main([*args, "--reference", str(red), "--out", str(tmp_path / "red.mp4")]) == 0
    assert main([*args, "--reference", str(green), "--out", str(tmp_path / "green.mp4")]) == 0
    assert fingerprint(tmp_path / "out.mp4") == fingerprint(tmp_path / "red.mp4")
    assert fingerprint(tmp_path / "green.mp4") != fingerprint(tmp_path / "red.mp4")

    capsys.readouterr()
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)).save(grey)
    for model, reference, said in ((model_dir, green, "trained without hints"), (tmp_path / "model", grey, "grey")):
        out = tmp_path / "refused.mp4"
        assert main(["video", str(clip), "--model", str(model), "--reference", str(reference), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "\n" not in err and not out.exists(), err
