"""Running a stage's loop in several processes through torchrun, and the one-line story when one dies.

The stage process stays what it always is (it holds the stage lock, and writes the manifest after
the job); it launches ``python -m torch.distributed.run`` (torchrun, PyTorch's own launcher and
elastic agent) and waits. Each rank joins the process group from torchrun's environment (gloo on CPU,
NCCL on GPUs). Ranks report a Python error by writing ``error-rank<R>.json`` beside the job file
before exiting, so the stage re-raises the rank's own one-line error (a diverged loss stays a
settings mistake, exit 2); a rank killed by a signal has no such file, and the stage reads torchrun's
root-cause report instead.

torchrun is a subprocess, not ``elastic_launch`` in this process: its agent installs signal handlers,
which only the main thread may do, and Prefect runs stages in worker threads.

This module imports no training code (from the train section only its torch-free RDZV_ENV): the train
stage's own job, what its process launches and what each rank runs, is tasks.train_ddp's, which sits
above this module and tasks.train_step (which takes :class:`World` from here) in the import graph.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from storage.atomic import write_json
from storage.errors import ConfigError, DataError, TransientError, UserFacingError
from tasks.settings.train import RDZV_ENV  # torch-free, beside the train.nodes setting that needs it

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class World:
    """This process's place in the job. The default is the single-process world: every collective is
    then the identity, so one loop serves both."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``values`` (on this rank's device) over ranks, the same on every rank (a
        loss that is NaN on one rank stops all of them together instead of leaving the others waiting in a
        collective)."""
        if self.size > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def resolve_accelerator(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is a setting mistake."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.accelerator=cuda but no CUDA device is visible; use auto or cpu")
    return requested


def join(accelerator: str) -> World:
    """Join the process group torchrun described in the environment (RANK, WORLD_SIZE, MASTER_ADDR...)."""
    if accelerator == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return World(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local))
    dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size())


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ the job file and error reports
def error_file(job: Path, rank: int) -> Path:
    return job.parent / f"error-rank{rank}.json"


@contextlib.contextmanager
def report_errors(job: Path, rank: int) -> Iterator[None]:
    """In a rank: any exception is written down, with its traceback, for the stage process, then
    re-raised (torchrun then stops the other ranks). User-facing errors keep their class, message and
    exit code. The rank prints nothing: the stage reports the cause in one line."""
    try:
        yield
    except BaseException as exc:
        record = {
            "type": type(exc).__name__,
            "message": str(exc) or type(exc).__name__,
            "user_facing": isinstance(exc, UserFacingError),
            "exit_code": getattr(exc, "exit_code", 1),
            "rerun_helps": getattr(exc, "rerun_helps", False),
            "traceback": traceback.format_exc(),
        }
        with contextlib.suppress(OSError):
            write_json(error_file(job, rank), record)
        raise


def check_parent(job_info: dict[str, Any]) -> None:
    """A rank on the stage process's machine stops when that process is gone: otherwise a killed stage
    leaves a job writing into a folder whose lock it no longer holds."""
    if job_info.get("host") != socket.gethostname():
        return
    try:
        os.kill(job_info["pid"], 0)
    except ProcessLookupError:
        raise TransientError("the stage process that started this training job is gone; stopping") from None
    except PermissionError:
        pass


class RankFailed(TransientError):
    """A rank died (killed, out of memory, a node lost): rerunning resumes from the last checkpoint."""


_KNOWN: dict[str, type[UserFacingError]] = {c.__name__: c for c in (ConfigError, DataError, TransientError)}


def _rank_error(
    record: dict[str, Any], rank: int, size: int, known: dict[str, type[UserFacingError]], where: Path
) -> Exception:
    cls = known.get(record["type"]) or _KNOWN.get(record["type"])
    if cls is not None:
        return cls(record["message"])
    if record["user_facing"]:
        err = UserFacingError(record["message"])
        err.exit_code, err.rerun_helps = record["exit_code"], record["rerun_helps"]
        return err
    last = record["message"].strip().splitlines()[-1] if record["message"].strip() else record["type"]
    return RankFailed(f"rank {rank} of {size} failed: {record['type']}: {last} (traceback in {where})")


_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def failures(report: str) -> dict[int, int]:
    """{rank: exit code} from torchrun's failure report (negative: killed by that signal)."""
    start = report.rfind("Failures:")
    return {int(r): int(c) for r, c in _FAILURE.findall(report[start:] if start >= 0 else "")}


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ------------------------------------------------------------------ launching
@dataclass(frozen=True)
class Launch:
    """How many processes, where they meet, and what they run."""

    nproc_per_node: int
    nnodes: int = 1
    rdzv_id: str = "colorize"
    module: str = "tasks.train_worker"

    def command(self, job: Path, endpoint: str | None = None) -> list[str]:
        """The torchrun command line. One node: standalone (a free local port). Several: c10d
        rendezvous at ``endpoint``; every node runs this same command."""
        where = (
            ["--standalone"]
            if self.nnodes == 1
            else ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={self.rdzv_id}"]
        )
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            *where,
            "--max-restarts=0",
            "-m",
            self.module,
            str(job),
        ]


_AGENT_FAILURE = re.compile(r"elastic/multiprocessing/api\.py:\d+\] failed \(exitcode")


def _tee(stream: Any, log_path: Path) -> None:
    """Copy the job's stderr to ours as it comes (progress bars included), and all of it to ``log_path``
    (where the stage reads torchrun's failure report). From torchrun's first failure line on, the rest
    (its own traceback and report, the surviving ranks' connection errors) goes to the log only: the
    stage says what happened in one line."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry, echo = "", True  # carry: the previous chunk's end, for a marker split across chunks
    with log_path.open("w", encoding="utf-8") as saved:
        while chunk := stream.read1(8192):
            text = decoder.decode(chunk)
            saved.write(text)
            if not echo:
                continue
            window, shown = carry + text, text
            if m := _AGENT_FAILURE.search(window):
                echo = False
                line_start = window.rfind("\n", 0, m.start()) + 1
                shown = window[len(carry) : line_start] if line_start > len(carry) else ""
            sys.stderr.write(shown)
            sys.stderr.flush()
            carry = window[-200:]


def launch(
    launch: Launch,
    job: Path,
    job_info: dict[str, Any],
    what: str,
    known_errors: dict[str, type[UserFacingError]] | None = None,
) -> None:
    """Write the job file, run torchrun on it and wait. Success: returns. A rank's own error: re-raised
    as its class. A rank killed: :class:`RankFailed` naming the rank and the signal, in one line."""
    endpoint = None
    if launch.nnodes > 1:
        endpoint = os.environ.get(RDZV_ENV)
        if not endpoint or ":" not in endpoint:
            raise ConfigError(
                f"train.nodes={launch.nnodes} needs {RDZV_ENV}=host:port, an address every node can reach "
                "(the first node's, for example)"
            )
    job.parent.mkdir(parents=True, exist_ok=True)
    for stale in job.parent.glob("error-rank*.json"):
        stale.unlink()
    write_json(job, {**job_info, "host": socket.gethostname(), "pid": os.getpid()})
    cmd = launch.command(job, endpoint)
    if launch.nnodes > 1:
        log.warning(
            "%s: waiting for %d more node(s); on each, with this work dir mounted at the same path, run:\n  %s",
            what,
            launch.nnodes - 1,
            " ".join(cmd),
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env, cwd=_ROOT)
    log_path = job.parent / "torchrun.log"
    reader = threading.Thread(target=_tee, args=(proc.stderr, log_path), daemon=True)
    reader.start()
    try:
        code = proc.wait()
    except BaseException:  # interrupted (Ctrl-C, a cancelled flow): the job must not outlive the stage
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        reader.join(timeout=10)
    if code == 0:
        return
    size = launch.nproc_per_node * launch.nnodes
    failed = failures(log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else "")
    # torchrun stops the surviving ranks with SIGTERM, and a survivor blocked in a collective with a
    # dead peer raises a connection error: neither is the cause. A rank killed by another signal is.
    killed = [r for r, c in failed.items() if c < 0 and c != -signal.SIGTERM]
    records = {r: json.loads(error_file(job, r).read_text()) for r in range(size) if error_file(job, r).is_file()}
    if not killed and records:
        rank = min(records, key=lambda r: (not records[r]["user_facing"], r))
        raise _rank_error(records[rank], rank, size, known_errors or {}, error_file(job, rank))
    rank = killed[0] if killed else min(failed, default=None)
    who = f"rank {rank} of {size}" if rank is not None else f"the torchrun job ({size} processes)"
    how = _how(failed[rank]) if rank is not None else f"exited with code {code}"
    log.warning("%s: torchrun's own report is in %s", what, log_path)
    raise RankFailed(f"{who} {how}")
