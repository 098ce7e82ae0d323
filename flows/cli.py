"""``colorize``: run the pipeline, show its state, colorize photos, open the UIs.

User mistakes (unknown dataset, bad setting, missing folder) are one-line errors with exit code 2,
checked before Prefect or MLflow start. Composing the settings imports the stage modules (and so
torch, about 2-4 s); Prefect and MLflow are imported only after validation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from flows.arguments import Parser, positive, side, vividness
from storage.errors import ConfigError, UserFacingError


def _workdir_path(value: str | None) -> Path:
    """``--workdir``, else ``$COLORIZE_WORKDIR``, else ``./work``."""
    return Path(value or os.environ.get("COLORIZE_WORKDIR") or "work").expanduser().resolve()


def _existing_workdir(value: str | None) -> Path:
    wd = _workdir_path(value)
    if not wd.is_dir():
        raise ConfigError(f"no work dir at {wd}; run `colorize run` first")
    return wd


def _workdir(value: str | None) -> Path:
    """The work dir for a run: created if needed, and checked to be writable before any work starts."""
    wd = _workdir_path(value)
    try:
        wd.mkdir(parents=True, exist_ok=True)
        probe = wd / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"work dir {wd} is not writable ({exc.strerror or exc})") from None
    return wd


def _shared_options() -> dict[str, dict]:
    """The options several commands take, each declared once (the same help in every command that takes
    it); :func:`_add` adds them where each command lists them."""
    # Light modules only: the help must not wait for torch.
    from model.choices import DEFAULT_MODEL, DEVICES, ENGINES, PRECISIONS

    return {
        "--workdir": {"help": "where data, runs and models go (default ./work or $COLORIZE_WORKDIR)"},
        "--model": {  # the commands that load it here: `serve` declares its own (no stage folder)
            "default": None,
            "help": f"models:/NAME@ALIAS, runs:/..., or a trained stage folder (default: {DEFAULT_MODEL})",
        },
        "--engine": {"choices": ENGINES, "default": "auto", "help": "auto: onnxruntime on a CPU when exported"},
        "--device": {
            "choices": DEVICES,
            "default": "auto",
            "help": "auto: a GPU when one is visible (default), else the CPU",
        },
        "--precision": {
            "choices": PRECISIONS,
            "default": "fp32",
            "help": "torch engine's arithmetic: fp32 (default) or bf16 (a GPU's fast path; colours a few levels off)",
        },
        "--vividness": {
            "type": vividness,
            "default": None,
            "help": "a classification-head model's colour, higher = more colour: the decoding temperature, "
            "from 0.01 (the most likely colour bin, often grey) to 1 (the distribution's mean, the most "
            "colour); default: the temperature it was evaluated at",
        },
        "--size": {"type": side, "default": None, "help": "network input size (default: the model's training size)"},
        "--host": {"default": "127.0.0.1", "help": "bind address (default 127.0.0.1: this machine only)"},
    }


def _add(parser: argparse.ArgumentParser, shared: dict[str, dict], *flags: str) -> None:
    for flag in flags:
        parser.add_argument(flag, **shared[flag])


def build_parser() -> argparse.ArgumentParser:
    # Light modules only: the help must not wait for torch.
    from flows.dag import STAGES
    from model import fusion
    from model.choices import DEFAULT_MODEL
    from storage.images import MAX_PIXELS
    from tasks.download import SOURCES

    shared = _shared_options()
    p = Parser(prog="colorize", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    r = sub.add_parser("run", help="run the pipeline (finished stages are cache hits)")
    r.add_argument("--dataset", default="sample", help=f"one of {', '.join(SOURCES)} (default: sample)")
    r.add_argument("--path", help="with --dataset folder: the folder of photos")
    r.add_argument("--preset", default=None, help="tiny, demo (default for sample) or paper")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.lr=1e-3 (repeatable)",
    )
    r.add_argument("--variants", help=f"comma list of fusion variants ({', '.join(fusion.names())})")
    r.add_argument("--seeds", help="comma list of training seeds: each variant is trained once per seed (the study)")
    r.add_argument("--until", default="register", help=f"last stage to run ({', '.join(STAGES)})")
    r.add_argument("--only", help="run just this stage (earlier stages must be finished)")
    r.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun STAGE despite its cache")
    _add(r, shared, "--workdir")

    s = sub.add_parser("status", help="each stage's last state in the work dir")
    _add(s, shared, "--workdir")

    i = sub.add_parser("image", help="colorize photos with the registered champion (or a given model)")
    i.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    i.add_argument("--out", "-o", default=None, help="output file (one input) or folder (default: ./colorized)")
    _add(i, shared, "--model")
    i.add_argument("--upscale", action="store_true", help="Real-ESRGAN x4 before colorizing (small photos)")
    i.add_argument(
        "--upscale-max", type=positive, default=256, help="only upscale photos up to this many px (longer side)"
    )
    _add(i, shared, "--size")
    i.add_argument(
        "--max-pixels", type=positive, default=MAX_PIXELS, help=f"refuse larger images (default {MAX_PIXELS:,})"
    )
    _add(i, shared, "--engine", "--device", "--precision", "--vividness", "--workdir")
    i.add_argument(
        "--hint",
        action="append",
        default=[],
        metavar="X,Y:#RRGGBB",
        help="a colour point at pixel X,Y of the photo (repeatable); only a/b are taken, the photo keeps its "
        "L; for a model trained with train.hints (docs/hints.md)",
    )
    i.add_argument("--hints", metavar="FILE", help="points from a hints JSON file (the web page's export)")
    i.add_argument(
        "--reference",
        metavar="PHOTO",
        help="follow this colour photo's palette (a model trained with train.hints=local+global)",
    )

    vid = sub.add_parser("video", help="colorize a video with temporally stable colour")
    vid.add_argument("input", metavar="INPUT", help="any video FFmpeg reads")
    vid.add_argument("--out", "-o", required=True, help="output video: .mp4, .mkv or .mov (H.264)")
    _add(vid, shared, "--model", "--engine")
    vid.add_argument("--temporal", choices=("on", "off"), default="on", help="off: each frame on its own")
    vid.add_argument("--batch", type=positive, default=8, help="frames per network call")
    vid.add_argument("--chunk", type=positive, default=240, help="frames per resumable chunk")
    _add(vid, shared, "--size", "--device", "--precision", "--vividness", "--workdir")
    vid.add_argument(
        "--reference",
        metavar="PHOTO",
        help="follow this colour photo's palette in every frame (a model trained with train.hints=local+global)",
    )

    a = sub.add_parser("app", help="a web page to colorize photos in a browser (Gradio), on 127.0.0.1")
    _add(a, shared, "--model", "--engine", "--device", "--precision", "--vividness", "--host")
    a.add_argument("--port", type=positive, default=7860)
    _add(a, shared, "--workdir")

    v = sub.add_parser("serve", help="the champion as a REST API (MLflow's scoring server), on 127.0.0.1")
    # its own --model: the server loads an MLflow model (registered or a run's), never a stage folder
    v.add_argument("--model", default=None, help=f"models:/NAME@ALIAS (default: {DEFAULT_MODEL})")
    _add(v, shared, "--device", "--precision", "--host")
    v.add_argument("--port", type=positive, default=5001)
    _add(v, shared, "--workdir")

    u = sub.add_parser("ui", help="start the MLflow and Prefect UIs on 127.0.0.1 for the work dir")
    _add(u, shared, "--workdir", "--host")
    u.add_argument("--mlflow-port", type=int, default=5000)
    u.add_argument("--prefect-port", type=int, default=4200)
    return p


def _check_stage(name: str, flag: str) -> str:
    from flows.dag import STAGES

    if name not in STAGES:
        raise ConfigError(f"{flag}: unknown stage {name!r}; choose from {', '.join(STAGES)}")
    return name


def cmd_run(args: argparse.Namespace) -> int:
    from flows.env import configure, require_prefect_api, stop_on_signals, stop_orphaned_servers

    # Before Prefect is imported: it reads its settings (the temporary server's start timeout) once, then.
    configure(_workdir_path(args.workdir))
    with warnings.catch_warnings():
        # A first run's work dir, which holds Prefect's home, is made after the checks below (a refused run
        # leaves nothing behind); Prefect's warning that it cannot make its home yet is noise.
        warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")
        from flows.pipeline import configure_run
    from tasks.download import SOURCES

    if args.dataset not in SOURCES:
        raise ConfigError(f"unknown dataset {args.dataset!r}; choose from {', '.join(SOURCES)}")
    overrides = list(args.overrides)
    if args.variants:
        overrides.append(f"train.variants={args.variants}")
    if args.seeds:
        overrides.append(f"train.seeds={args.seeds}")
    preset = args.preset or ("tiny" if os.environ.get("COLORIZE_PRESET") == "tiny" else "demo")
    until = _check_stage(args.until, "--until")
    only = _check_stage(args.only, "--only") if args.only else None
    for f in args.force:
        _check_stage(f, "--force")
    if args.path and not SOURCES[args.dataset].needs_path:
        readers = ", ".join(n for n, s in SOURCES.items() if s.needs_path)
        raise ConfigError(f"--path is only for --dataset {readers}")
    path = str(Path(args.path).expanduser().resolve()) if args.path else None
    cfg = configure_run(args.dataset, preset, overrides, path)
    from flows.pipeline import preflight, redact_overrides

    preflight(cfg)
    workdir = _workdir(args.workdir)
    if path:
        if not Path(path).is_dir():
            raise ConfigError(f"--path {args.path}: no such folder")
        from storage.images import find_images

        if not find_images(Path(path), exclude=workdir):
            raise ConfigError(f"--path {args.path}: holds no images (jpg, png, webp, tiff, bmp, gif)")

    stop_on_signals()
    require_prefect_api()
    if not os.environ.get("PREFECT_API_URL") and stop_orphaned_servers(workdir):
        logging.getLogger(__name__).warning("stopped a Prefect server left behind by a killed run in %s", workdir)
    from flows.pipeline import pipeline

    for name in ("prefect.flow_runs", "prefect.task_runs"):  # failures are reported below, in one line
        logging.getLogger(name).setLevel(logging.CRITICAL)

    result = pipeline(
        dataset=cfg.download.dataset,
        preset=preset,
        overrides=redact_overrides(overrides),  # the run's record in Prefect; the flow runs `config`
        config=cfg,  # validated and checked above: the flow takes it as it is
        path=path,
        workdir=str(workdir),
        until=until,
        only=only,
        force=args.force,
    )
    print_summary(result, workdir)
    return 0


def print_summary(result: dict, workdir: Path) -> None:
    print("\nstages:")
    for call in result["calls"]:
        print(f"  {call['stage']:<16} {call['state']:<7} {call['key'] or ''}")
    for stage, folder in result["stages"].items():
        print(f"  {stage}: {folder}")
    if "metrics_md" in result:
        print(f"\ntest metrics ({result['metrics_md']}):\n")
        print(Path(result["metrics_md"]).read_text())
    if "registered" in result:
        r = result["registered"]
        verdict = "beats" if r["beats_baseline"] else "does NOT beat"
        over = f" (mean of {r['n_seeds']} seeds; registered: seed {r['seed']})" if r["n_seeds"] > 1 else ""
        sure = ", 95% interval excludes 0" if r["beats_baseline_95ci"] else ""
        print(
            f"champion: models:/{r['model_name']}@{r['alias']} = version {r['version']} ({r['variant']} fusion, "
            f"{r['metric']}={r['value']:.5g}{over}, {verdict} the grayscale baseline{sure})"
            + ("" if r.get("onnx_export", True) else "; no ONNX export, the torch engine serves it")
        )
        print("\nnext:")
        print(f"  colorize image photo.jpg --out photo_color.png --workdir {workdir}")
        print(f"  colorize ui --workdir {workdir}        # MLflow and Prefect UIs on 127.0.0.1")


def cmd_status(args: argparse.Namespace) -> int:
    from flows.dag import STAGES

    workdir = _existing_workdir(args.workdir)
    print(f"{'stage':<10} {'state':<7} {'seconds':>8}  key               when")
    for stage in STAGES:
        last = workdir / stage / "last.json"
        if not last.is_file():
            print(f"{stage:<10} {'-':<7}")
            continue
        try:
            s = json.loads(last.read_text())
            state = s["state"]
            if not isinstance(state, str):
                raise TypeError(f"state is {state!r}")
            # a field of the wrong type (a hand edit, "seconds": null) is as malformed as a missing state
            if not isinstance(s.get("seconds", 0), (int, float)) or isinstance(s.get("seconds"), bool):
                raise TypeError(f"seconds is {s['seconds']!r}")
            for field in ("key", "time", "error"):
                if not isinstance(s.get(field, ""), (str, type(None)) if field == "error" else str):
                    raise TypeError(f"{field} is {s[field]!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"{stage:<10} {'unreadable':<7}  ({last}: {exc}; the next run rewrites it)")
            continue
        err = f"  ({s['error']})" if s.get("error") else ""
        print(f"{stage:<10} {state:<7} {s.get('seconds', ''):>8}  {s.get('key', ''):<17} {s.get('time', '')}{err}")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from flows.colorize_images import colorize_files

    workdir = _workdir_path(args.workdir)
    from flows.env import configure

    configure(workdir)
    return colorize_files(args, workdir)


def cmd_video(args: argparse.Namespace) -> int:
    from flows.colorize_images import read_guidance
    from flows.colorize_video import VideoColorizer, check_output, load_model, probe
    from flows.env import configure
    from model.inference import Hinted
    from model.loading import Running
    from storage.fetch import file_digest

    src, dest = Path(args.input).expanduser(), Path(args.out).expanduser()
    workdir = _workdir_path(args.workdir)
    configure(workdir)
    info = probe(src)  # a bad input or output is refused (VideoError, exit 2) before the model loads
    check_output(src, dest, info)
    guidance = read_guidance(args)  # a grey or unreadable reference: exit 2 before the model loads
    net, size, identity = load_model(args.model, workdir, Running.from_args(args), hinted=bool(guidance))
    size = args.size or size
    if guidance:  # the same palette for every frame; it changes the colours, so it keys the chunks
        net = Hinted(net, guidance.inputs(getattr(net.spec, "hints", "off"), size, size, size))
        identity = {**identity, "reference": file_digest(Path(args.reference).expanduser(), "sha256")}
    colorizer = VideoColorizer(net, size, args.temporal == "on", args.batch, args.chunk)
    stats = colorizer.run(src, dest, identity, info)
    replaced = " (replaced the existing file)" if stats["replaced"] else ""
    w, h = stats["size"]
    print(f"{src} -> {dest}{replaced}: {stats['frames']} frames at {stats['rate']} fps, {w}x{h}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from flows.env import configure, open_registry, require_free_port

    require_free_port(args.host, args.port)  # before the model loads
    workdir = _workdir_path(args.workdir)
    configure(workdir)
    open_registry(workdir)  # a moved or copied work dir serves its own files
    from flows.app import serve
    from model.loading import Running

    return serve(workdir, args.model, Running.from_args(args), args.host, args.port)


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.env import configure, require_free_port, require_workdir

    require_free_port(args.host, args.port)
    workdir = _existing_workdir(args.workdir)
    require_workdir(workdir)
    configure(workdir)
    from flows.rest import serve

    return serve(workdir, args.model, args.host, args.port, args.device, args.precision)


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.env import require_free_port, require_workdir

    if args.mlflow_port == args.prefect_port:
        raise ConfigError(f"--mlflow-port and --prefect-port are both {args.mlflow_port}; they must differ")
    require_free_port(args.host, args.mlflow_port, "--mlflow-port")
    require_free_port(args.host, args.prefect_port, "--prefect-port")
    workdir = _existing_workdir(args.workdir)
    require_workdir(workdir, writable=True)
    from flows.ui import serve

    return serve(workdir, args.host, args.mlflow_port, args.prefect_port)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "urllib3", "mlflow", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "status": cmd_status,
        "image": cmd_image,
        "video": cmd_video,
        "app": cmd_app,
        "serve": cmd_serve,
        "ui": cmd_ui,
    }
    try:
        return handlers[args.command](args)
    except UserFacingError as exc:  # the one family of user-facing errors; each class carries its exit code
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        from storage.errors import disk_full

        if not disk_full(exc):  # a bug: the traceback is what helps
            raise
        print(f"error: {disk_full(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
