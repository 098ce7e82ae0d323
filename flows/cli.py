"""``colorize``: run the pipeline, show its state, colorize photos, open the UIs.

User mistakes (unknown dataset, bad setting, missing folder) are one-line errors with exit code 2,
checked before Prefect or MLflow start. Heavy imports happen only after validation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from flows.config import DATASETS, STAGES, VARIANTS, ConfigError, build_config

EXIT_USAGE = 2


class UserError(Exception):
    """Reported as ``error: <message>`` and exit code 2, without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"error: {message} (see colorize {self.prog.split()[-1]} --help)\n")


def _workdir(value: str | None) -> Path:
    wd = Path(value or os.environ.get("COLORIZE_WORKDIR") or "work").expanduser()
    try:
        wd.mkdir(parents=True, exist_ok=True)
        probe = wd / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"work dir {wd} is not writable ({exc.strerror or exc})") from None
    return wd.resolve()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="colorize", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run the pipeline (finished stages are cache hits)")
    r.add_argument("--dataset", default="sample", help=f"one of {', '.join(DATASETS)} (default: sample)")
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
    r.add_argument("--variants", help=f"comma list of fusion variants ({', '.join(VARIANTS)})")
    r.add_argument("--until", default="register", help=f"last stage to run ({', '.join(STAGES)})")
    r.add_argument("--only", help="run just this stage (its inputs must be finished)")
    r.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun STAGE despite its cache")
    r.add_argument("--workdir", help="where data, runs and models go (default ./work or $COLORIZE_WORKDIR)")

    s = sub.add_parser("status", help="each stage's last state in the work dir")
    s.add_argument("--workdir")
    return p


def _check_stage(name: str, flag: str) -> str:
    if name not in STAGES:
        raise UserError(f"{flag}: unknown stage {name!r}; choose from {', '.join(STAGES)}")
    return name


def cmd_run(args: argparse.Namespace) -> int:
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    overrides = list(args.overrides)
    if args.variants:
        overrides.append(f"train.variants={args.variants}")
    preset = args.preset or ("tiny" if os.environ.get("COLORIZE_PRESET") == "tiny" else "demo")
    try:
        build_config(preset, overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    until = _check_stage(args.until, "--until")
    for f in args.force:
        _check_stage(f, "--force")
    if args.dataset == "folder":
        if not args.path:
            raise UserError("--dataset folder needs --path DIR")
        if not Path(args.path).is_dir():
            raise UserError(f"--path {args.path}: no such folder")
    elif args.path:
        raise UserError("--path is only for --dataset folder")
    workdir = _workdir(args.workdir)

    from flows.env import configure

    configure(workdir)
    from flows.pipeline import pipeline

    result = pipeline(
        dataset=args.dataset,
        preset=preset,
        overrides=overrides,
        path=str(Path(args.path).resolve()) if args.path else None,
        workdir=str(workdir),
        until=until,
        force=args.force,
    )
    for call in result["calls"]:
        print(f"  {call['stage']:<16} {call['state']:<7} {call['key'] or ''}")
    for stage, folder in result["stages"].items():
        print(f"{stage}: {folder}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or os.environ.get("COLORIZE_WORKDIR") or "work")
    if not workdir.is_dir():
        raise UserError(f"no work dir at {workdir}; run `colorize run` first")
    print(f"{'stage':<10} {'state':<7} {'seconds':>8}  key               when")
    for stage in STAGES:
        last = workdir / stage / "last.json"
        if last.is_file():
            s = json.loads(last.read_text())
            err = f"  ({s['error']})" if s.get("error") else ""
            print(
                f"{stage:<10} {s['state']:<7} {s.get('seconds', ''):>8}  {s.get('key', ''):<17} "
                f"{s.get('time', '')}{err}"
            )
        else:
            print(f"{stage:<10} {'-':<7}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "status": cmd_status}
    try:
        return handlers[args.command](args)
    except (UserError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
