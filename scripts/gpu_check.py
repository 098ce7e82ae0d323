"""The product on a GPU machine, in one prepared run: writes ``report.md`` and ``report.json`` to ``--out``.

Parts, in order (each timed; one whose packages are missing is skipped with the reason, one that fails
is reported in one line with its log kept, and the others go on):

- ``env``: Python, torch, the card, what is importable.
- ``train_sweep``: ``bench/train.py --sweep`` at 128 and 224 px, batch 8-256, eager vs CUDA graphs:
  ms/step, img/s, model TFLOP/s, share of the measured bf16 matrix rate, the loader's share.
- ``train_tiny``: the train stage end to end on the device at the tiny preset (captured step, checkpoint,
  MLflow run, stage folder).
- ``train_classification``: the same with ``train.head=classification`` (the rebalanced loss inside the
  captured step), then evaluated.
- ``pipeline``: a CIFAR-10-sized stand-in (``--crops`` 32x32 crops cut from the sample photos) through
  upscale (Real-ESRGAN when its weights are here, else bicubic, said in the report), prepare at 224 px,
  one variant x one epoch of the ``gpu`` preset, and evaluate on the device; each stage's seconds.
- ``colorize_image``: ``colorize image`` on the device (float32 and bf16) and on the CPU, the same
  trained model and photos: seconds and the largest pixel difference from the CPU's (the promise: at
  most 1/255 in float32).
- ``colorize_video``: ``colorize video`` at 480p on the device: frames/s of the whole command; and the
  device's frames against the CPU's through the same pipeline.
- ``upscale``: ``bench/upscale.py``'s GPU mode (the stage's torch engine, fp32 and bf16).
- ``ddp``: the train stage with ``train.devices`` = the GPU count, when there are two or more.

ImageNet weights are not fetched (``train.pretrained=false``): the machine has no internet, and speed
does not depend on the weights; nor are Real-ESRGAN's (the carried file or nothing). ``--device cpu --quick``
runs every part at toy sizes on any machine. Every part's timeout comes out of one ``--budget`` (440 s,
under gpu_check.sh's 470 s), the report is rewritten after each part, and SIGTERM (a device's time limit)
writes it, removes the scratch folder and exits 143: a check cut short returns what it measured. No
progress bars (TQDM_DISABLE): one line per part.

    bash scripts/gpu_check.sh                  # on the GPU machine: the wheels, then this
    python scripts/gpu_check.py --device cpu --quick [--out DIR]   # a dry run here (default: a temporary DIR)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE_PAPER_IMG_S = 64.6  # the eager step at the paper preset's shape on an H200 (224 px, batch 8, bf16)


class Skipped(Exception):
    """A part that cannot run here; the message says why."""


@dataclass
class Part:
    name: str
    status: str = "ok"
    seconds: float = 0.0
    summary: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skipped(f"not importable here: {', '.join(missing)} (scripts/gpu_wheels.sh lists the wheels)")


class Cut(BaseException):
    """SIGTERM (the device's time limit, or gpu_check.sh's own timeout): write what was measured, stop."""


DEADLINE = [math.inf]  # time.monotonic() by which every part must be done (--budget)
MARGIN = 15.0  # seconds kept back for the report and the clean-up


def remaining() -> float:
    return DEADLINE[0] - time.monotonic() - MARGIN


def command(cmd: list[str], log: Path, timeout: float) -> str:
    """Run ``cmd`` from the repository root; its output goes to ``log``; a failure raises its last line.
    Its timeout is cut to what the budget has left (a part that has no time left is skipped)."""
    timeout = min(timeout, remaining())
    if timeout < 20:
        raise Skipped(f"no time left in the budget ({max(0, round(timeout))} s)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        last = text.strip().splitlines()[-1] if text.strip() else f"exit {proc.returncode}"
        raise RuntimeError(f"{' '.join(cmd[1:3])} exited {proc.returncode}: {last} (log: {log.name})")
    return text


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args, self.torch = args, torch
        self.out = Path(args.out)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.device = args.device
        self.cuda = args.device == "cuda"
        self.parts: list[Part] = []
        self.trained: dict[str, Any] | None = None

    def run(self, name: str, fn: Callable[[Part], None]) -> None:
        """One part, then the report rewritten (report.md and report.json grow part by part), so a check
        cut short still returns what it measured."""
        part = Part(name)
        t0 = time.perf_counter()
        try:
            if remaining() < 20:
                raise Skipped("no time left in the budget")
            fn(part)
        except Skipped as exc:
            part.status, part.summary = "skipped", str(exc)
        except subprocess.TimeoutExpired as exc:
            part.status, part.summary = "failed", f"cut at {exc.timeout:.0f} s to stay within the budget"
        except Cut:
            part.status, part.summary = "cut", "stopped by SIGTERM (a time limit) before it finished"
            raise
        except Exception as exc:  # noqa: BLE001 - one part's failure is reported, the others still run
            part.status, part.summary = "failed", f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
            (self.out / f"{name}.traceback.txt").write_text(traceback.format_exc())
        finally:
            part.seconds = round(time.perf_counter() - t0, 1)
            self.parts.append(part)
            self.write()
            print(f"[{part.status}] {name} ({part.seconds} s): {part.summary}", flush=True)

    # ------------------------------------------------------------------ parts
    def env(self, part: Part) -> None:
        torch = self.torch
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        card = torch.cuda.get_device_name(0) if self.cuda else platform.processor() or platform.machine()
        mods = ["pydantic", "webdataset", "mlflow", "av", "spandrel", "skimage", "pandas", "matplotlib", "onnxruntime"]
        part.figures = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": card,
            "gpus": torch.cuda.device_count() if self.cuda else 0,
            "cpus": os.cpu_count(),
            "importable": {m: importlib.util.find_spec(m) is not None for m in mods},
        }
        part.summary = f"{card}; torch {torch.__version__}; Python {platform.python_version()}"

    def train_sweep(self, part: Part) -> None:
        needs("pydantic", "webdataset")
        quick = self.args.quick
        sizes, batches, steps = ("64", "2,4", "2") if quick else ("128,224", "8,32,64,128,256", "20")
        js = self.out / "train_sweep.json"
        cmd = [sys.executable, "bench/train.py", "--sweep", "--device", self.device, "--sizes", sizes]
        cmd += ["--batches", batches, "--steps", steps, "--json", str(js)] + (["--bf16"] if self.cuda else [])
        command(cmd, self.out / "train_sweep.log", 420)
        report = json.loads(js.read_text())
        part.figures = report
        ok = [r for r in report["rows"] if "error" not in r]
        best = max(ok, key=lambda r: r["tflops"])
        paper = [r for r in ok if r["size"] == 224 and r["batch"] == 8]
        part.summary = f"best {best['tflops']:.1f} TFLOP/s ({best['img_per_s']:.0f} img/s at {best['size']} px, "
        part.summary += f"batch {best['batch']}, {best['step']})"
        if paper:
            fastest = max(paper, key=lambda r: r["img_per_s"])
            part.figures["paper_shape_speedup"] = fastest["img_per_s"] / BASELINE_PAPER_IMG_S
            part.summary += f"; paper shape {fastest['img_per_s']:.0f} img/s = x{fastest['img_per_s'] / 64.6:.1f}"

    def _stages(self, wd: Path, preset: str, sets: list[str]) -> dict[str, Any]:
        """download -> upscale -> prepare -> train (one variant) -> evaluate, called directly (no Prefect)."""
        from flows.config import build_config
        from tasks import download, evaluate, prepare, train, upscale

        cfg = build_config(preset, sets)
        seconds: dict[str, float] = {}

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            t0 = time.perf_counter()
            result = fn()
            seconds[name] = round(time.perf_counter() - t0, 1)
            return result

        dl = timed("download", lambda: download.run(download.plan(cfg.download, cfg.seed, wd)).manifest)
        up = None
        if cfg.download.lowres_crops_per_photo:
            up = timed("upscale", lambda: upscale.run(upscale.plan(cfg.upscale, dl, wd)).manifest)
        prep = timed("prepare", lambda: prepare.run(prepare.plan(cfg.prepare, cfg.seed, dl, up, wd)).manifest)
        variant = cfg.train.variants[0]
        trained = timed("train", lambda: train.run(train.plan(cfg.train, cfg.seed, variant, prep, wd)).manifest)
        ev = evaluate.plan(cfg.evaluate, prep, [trained], wd)
        metrics = timed("evaluate", lambda: evaluate.run(ev).manifest)
        self.trained = trained
        return {"seconds": seconds, "train": trained, "evaluate": metrics, "prepared_counts": prep["counts"]}

    def train_tiny(self, part: Part) -> None:
        needs("pydantic", "webdataset", "mlflow", "skimage", "pandas", "matplotlib")
        sets = [f"train.accelerator={self.device}", "train.pretrained=false", "train.variants=max"]
        sets += ["download.lowres_crops_per_photo=0", f"evaluate.device={self.device}", "evaluate.lpips=false"]
        result = self._stages(self.work / "tiny", "tiny", sets)
        t = result["train"]
        part.figures = {"seconds": result["seconds"], "steps": t["steps"], "accelerator": t["accelerator"]}
        part.summary = f"{t['steps']} steps on {t['accelerator']}; stages {result['seconds']}"

    def train_classification(self, part: Part) -> None:
        """The classification head's step (the rebalanced loss included) captured as a CUDA graph."""
        needs("pydantic", "webdataset", "mlflow", "skimage", "pandas", "matplotlib")
        sets = [f"train.accelerator={self.device}", "train.pretrained=false", "train.variants=max"]
        sets += ["train.head=classification", "train.max_steps=8", "download.lowres_crops_per_photo=0"]
        sets += [f"evaluate.device={self.device}", "evaluate.lpips=false"]
        result = self._stages(self.work / "classification", "tiny", sets)
        t, row = result["train"], result["evaluate"]["table"][-1]
        part.figures = {"seconds": result["seconds"], "steps": t["steps"], "rgb_mse": row["rgb_mse"]}
        part.summary = f"{t['steps']} steps on {t['accelerator']}; test rgb_mse {row['rgb_mse']:.4f}"

    def pipeline(self, part: Part) -> None:
        needs("pydantic", "webdataset", "mlflow", "skimage", "pandas", "matplotlib")
        from tasks.download import SAMPLE_PHOTOS

        quick = self.args.quick
        per_photo = math.ceil(self.args.crops / len(SAMPLE_PHOTOS))
        weights, method = self._upscale_weights()
        sets = [
            f"download.lowres_crops_per_photo={per_photo}",
            "download.highres_crops_per_photo=0",
            f"upscale.method={method}",
            f"upscale.batch_size={16 if quick else 256}",
            f"upscale.bf16={str(self.cuda).lower()}",
            f"prepare.image_size={32 if quick else 224}",
            "train.variants=concat",
            "train.epochs=1",
            "train.pretrained=false",
            f"train.accelerator={self.device}",
            "train.checkpoint_every=100000",
            f"evaluate.device={self.device}",
            "evaluate.lpips=false",
        ]
        if weights:
            sets.append(f"upscale.weights={weights}")
        if quick:
            sets += ["train.batch_size=8", "train.bf16=false", "evaluate.batch_size=16", "train.warmup_steps=2"]
        result = self._stages(self.work / "pipeline", "gpu", sets)
        total = sum(result["seconds"].values())
        t = result["train"]
        part.figures = {
            **result["seconds"],
            "total_seconds": round(total, 1),
            "crops": self.args.crops,
            "upscale_method": method,
            "prepared_counts": result["prepared_counts"],
            "train_images_per_second": t["images_per_second"],
            "train_steps": t["steps"],
        }
        note = "" if weights else " (no Real-ESRGAN weights here: bicubic)"
        part.summary = f"{total:.0f} s in all{note}; stages {result['seconds']}; train {t['images_per_second']} img/s"
        if not quick:
            full = result["seconds"]["upscale"] + result["seconds"]["prepare"] + 9 * result["seconds"]["train"]
            part.figures["paper_run_estimate_seconds"] = round(full + 3 * result["seconds"]["evaluate"], 1)

    def _upscale_weights(self) -> tuple[str | None, str]:
        """(the Real-ESRGAN weights file to use, the upscale method): bicubic when none are here."""
        with contextlib.suppress(Exception):
            from model.realesrgan import resolve_weights

            info = resolve_weights(allow_download=False)  # no network here: never wait on one
            if importlib.util.find_spec("spandrel") is not None:
                return str(info.path), "realesrgan"
        return None, "bicubic"

    def _photos(self, folder: Path, n: int = 4) -> list[Path]:
        import numpy as np
        from PIL import Image
        from skimage import data

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, rgb in enumerate([data.astronaut(), data.coffee(), data.chelsea(), data.rocket()][:n]):
            side = 256 if self.args.quick else 1024
            img = Image.fromarray(np.asarray(rgb)).resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
            paths.append(folder / f"photo{i}.png")
            img.save(paths[-1])
        return paths

    def colorize_image(self, part: Part) -> None:
        if self.trained is None:
            raise Skipped("no trained model (the pipeline part did not finish)")
        import numpy as np
        from PIL import Image

        src = self.work / "photos"
        photos = self._photos(src)
        outs, seconds = {}, {}
        for device, precision in dict.fromkeys([("cpu", "fp32"), (self.device, "fp32"), (self.device, "bf16")]):
            name = f"{device}-{precision}"
            out = self.work / f"colorized-{name}"
            cmd = [sys.executable, "-m", "flows.cli", "image", str(src), "--out", str(out), "--engine", "torch"]
            cmd += ["--model", self.trained["folder"], "--device", device, "--precision", precision]
            cmd += ["--workdir", str(self.work / "cli")]  # never the checkout's ./work
            t0 = time.perf_counter()
            command(cmd, self.out / f"colorize_image_{name}.log", 300)
            seconds[name] = round(time.perf_counter() - t0, 1)
            outs[name] = [np.asarray(Image.open(out / p.name)).astype(int) for p in photos]
        diffs = {
            name: max(int(np.abs(a - b).max()) for a, b in zip(got, outs["cpu-fp32"], strict=True))
            for name, got in outs.items()
            if name != "cpu-fp32"
        }
        part.figures = {"seconds": seconds, "max_difference_from_cpu_fp32": diffs, "photos": len(photos)}
        part.summary = f"{len(photos)} photos: seconds {seconds}; largest difference from the CPU's {diffs} (/255)"

    def colorize_video(self, part: Part) -> None:
        needs("av")
        if self.trained is None:
            raise Skipped("no trained model (the pipeline part did not finish)")
        import numpy as np

        from flows.colorize_video import VideoColorizer
        from model.colorizer import load_folder

        frames = 24 if self.args.quick else 300
        clip = self._clip(self.work / "clip.mp4", frames)
        out = self.work / "clip-colorized.mp4"
        cmd = [sys.executable, "-m", "flows.cli", "video", str(clip), "--out", str(out)]
        cmd += ["--model", self.trained["folder"], "--device", self.device, "--engine", "torch"]
        cmd += ["--workdir", str(self.work / "cli")]
        t0 = time.perf_counter()
        command(cmd, self.out / "colorize_video.log", 300)
        fps = frames / (time.perf_counter() - t0)
        net = load_folder(self.trained["folder"]).eval()
        size = net.spec.image_size
        sample = [self._frame(i) for i in range(8)]
        cpu = list(VideoColorizer(net, size, temporal=False).colorize_frames(sample, None))
        dev = list(VideoColorizer(net.to(self.device), size, temporal=False).colorize_frames(sample, None))
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(cpu, dev, strict=True))
        part.figures = {"frames": frames, "frames_per_second": round(fps, 1), "max_difference_levels": diff}
        part.summary = f"{frames} frames at 854x480: {fps:.1f} frames/s (whole command); vs CPU {diff}/255"

    def _frame(self, i: int) -> Any:
        """Frame ``i`` of a pan across a photo, 854x480."""
        import numpy as np
        from PIL import Image
        from skimage import data

        big = Image.fromarray(data.astronaut()).resize((1400, 1000))
        x = (i * 2) % (1400 - 854)
        return np.asarray(big.crop((x, 100, x + 854, 580)))

    def _clip(self, path: Path, frames: int) -> Path:
        import av

        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 854, 480, "yuv420p"
            for i in range(frames):
                for packet in stream.encode(av.VideoFrame.from_ndarray(self._frame(i), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        return path

    def upscale(self, part: Part) -> None:
        needs("spandrel")
        weights, _ = self._upscale_weights()
        quick = self.args.quick
        cmd = [sys.executable, "bench/upscale.py", "--device", self.device, "--rounds", "1" if quick else "3"]
        cmd += ["--batches", "4" if quick else "64,256", "--images", "8" if quick else "512"]
        if weights is None:
            cmd.append("--random-weights")
        text = command(cmd, self.out / "upscale.log", 300)
        lines = [ln for ln in text.splitlines() if "img/s" in ln or ln.startswith("RATIO")]
        part.figures = {"lines": lines, "weights": "real" if weights else "random"}
        part.summary = "; ".join(lines[-3:])

    def ddp(self, part: Part) -> None:
        count = self.torch.cuda.device_count() if self.cuda else 0
        if count < 2:
            raise Skipped(f"{count} GPU(s): DDP on GPUs needs two or more (on a CPU, the test suite runs it)")
        needs("pydantic", "webdataset", "mlflow", "skimage", "pandas", "matplotlib")
        sets = [f"train.devices={count}", "train.accelerator=cuda", "train.pretrained=false", "train.batch_size=8"]
        sets += ["download.lowres_crops_per_photo=0", "evaluate.device=cuda", "evaluate.lpips=false"]
        result = self._stages(self.work / "ddp", "tiny", sets)
        part.figures = {"seconds": result["seconds"], "world_size": result["train"]["world_size"]}
        part.summary = f"world size {result['train']['world_size']}; stages {result['seconds']}"

    # ------------------------------------------------------------------ the report
    def write(self) -> None:
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "args": vars(self.args),
            "parts": [vars(p) for p in self.parts],
        }
        (self.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        env = next((p for p in self.parts if p.name == "env"), Part("env"))
        lines = [
            f"# GPU check: {env.figures.get('device', '?')}",
            "",
            f"{report['date']}; `scripts/gpu_check.py --device {self.device}"
            f"{' --quick' if self.args.quick else ''}`; torch {env.figures.get('torch')}, "
            f"Python {env.figures.get('python')}",
            "",
            "| part | status | seconds | result |",
            "|---|---|---|---|",
        ]
        lines += [f"| {p.name} | {p.status} | {p.seconds} | {p.summary.replace('|', '/')} |" for p in self.parts]
        sweep = next((p for p in self.parts if p.name == "train_sweep" and p.status == "ok"), None)
        if sweep:
            f = sweep.figures
            lines += [
                "",
                f"Train step ({f['device']}, matrix rate {f['matrix_tflops']:.3g} TFLOP/s {f['matrix_dtype']}):",
                "",
                "| size | batch | step | ms/step | img/s | TFLOP/s | of peak | loader |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in sweep.figures["rows"]:
                if "error" in r:
                    lines.append(f"| {r['size']} | {r['batch']} | {r['step']} | {r['error']} | | | | |")
                    continue
                lines.append(
                    f"| {r['size']} | {r['batch']} | {r['step']} | {r['ms_per_step']:.1f} | {r['img_per_s']:.0f} "
                    f"| {r['tflops']:.1f} | {r['share_of_peak'] * 100:.1f}% | {r['loader_share'] * 100:.1f}% |"
                )
        (self.out / "report.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", help="where report.md and report.json go (default: a new temporary folder, printed)")
    ap.add_argument(
        "--crops", type=int, help="pipeline: 32x32 crops, the CIFAR-10-sized stand-in (default 60000; 400 with --quick)"
    )
    ap.add_argument("--quick", action="store_true", help="toy sizes: a dry run of every part")
    ap.add_argument("--parts", help="comma-separated subset of the parts")
    ap.add_argument(
        "--budget", type=float, default=440, help="seconds for every part (gpu_check.sh's outer limit is 470)"
    )
    args = ap.parse_args()
    args.crops = args.crops or (400 if args.quick else 60_000)
    args.out = args.out or tempfile.mkdtemp(prefix="gpu-check-report-")
    print(f"report: {Path(args.out) / 'report.md'} (written after every part)", flush=True)
    DEADLINE[0] = time.monotonic() + args.budget
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars: only the output's last 12,000 characters come back
    check = Check(args)
    os.environ.setdefault("TORCH_HOME", str(check.work / "torch"))  # nothing fetched, nothing left behind

    def cut(signum: int, frame: Any) -> None:
        raise Cut

    signal.signal(signal.SIGTERM, cut)
    parts = [
        "env",
        "train_sweep",
        "train_tiny",
        "train_classification",
        "pipeline",
        "colorize_image",
        "colorize_video",
        "upscale",
        "ddp",
    ]
    chosen = ["env", *[p for p in args.parts.split(",") if p != "env"]] if args.parts else parts
    try:
        for name in chosen:
            check.run(name, getattr(check, name))
    except Cut:
        print("cut by SIGTERM: the report has every part that finished", flush=True)
        return 143
    finally:
        shutil.rmtree(check.work, ignore_errors=True)  # the check's scratch (work dirs, photos, clips)
        print(f"report: {Path(args.out) / 'report.md'}", flush=True)
    return 1 if any(p.status == "failed" for p in check.parts) else 0


if __name__ == "__main__":
    sys.exit(main())
