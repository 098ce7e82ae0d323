"""Loading a model for use: a registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), an MLflow
run's (``runs:/...``) or a trained stage folder, run as :class:`Running` says -> a ready engine.

:func:`load_engine` is the one loader of ``colorize image``, ``video`` and ``app`` (through
flows.colorize_images.PhotoColorizer and flows.colorize_video.load_model); ``colorize serve`` checks its
device with :meth:`Running.where` before it starts a server, whose process loads the registered model
through its pyfunc. The loader and the pyfunc share one rule for ``--engine auto``
(model.inference.choose_engine) and one placement (model.inference.place); the loader passes the device
and precision to a pyfunc it loads in this process as values (model.pyfunc.placing), the environment
(``$COLORIZE_DEVICE``, ``$COLORIZE_PRECISION``) is only for a server process.

It lives in model/, not flows/: the rules it shares with the registered model's pyfunc are the model
layer's (which cannot import flows/ or tasks/), and it needs nothing above that layer (the registry is
opened by storage.tracking.use_store, the one place a tracking location is set). It is not in the
registered model's own code (model.pyfunc does not import it), so the served bundle stays small. Importing
it is light (no torch, no MLflow): the commands' options build a :class:`Running` without a network.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.choices import DEFAULT_MODEL
from storage.errors import ConfigError

if TYPE_CHECKING:
    import torch


class NoModel(ConfigError):
    """No usable model: the message says how to get one (exit 2)."""


class UsageError(ConfigError):
    """The command line asks for something that cannot be done safely (exit 2, nothing written)."""


@dataclass(frozen=True)
class Running:
    """How a model runs, as the commands' options say: ``engine`` ``torch``, ``onnx`` (the registered
    ONNX export on onnxruntime, a float32 CPU engine) or ``auto`` (model.inference.choose_engine: onnx on
    a CPU in fp32 when the model has an export, torch otherwise; a stage folder has no export and runs on
    torch); ``device`` ``auto`` (CUDA when visible), ``cpu`` or ``cuda``; ``precision`` ``fp32`` or
    ``bf16`` (autocast, the torch engine's); ``vividness`` a classification model's decoding temperature
    (None: its own; refused for a regression model)."""

    engine: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    vividness: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Running:
        return cls(args.engine, args.device, args.precision, getattr(args, "vividness", None))

    def where(self) -> torch.device:
        """The device the network runs on, or a :class:`NoModel` (one line, exit 2) for a device that is
        not there or an engine that cannot run on it or in this precision."""
        from model.inference import resolve_device

        try:
            where = resolve_device(self.device)
        except ValueError as exc:
            raise NoModel(str(exc)) from None
        if where.type != "cpu" and self.engine == "onnx":
            raise NoModel(f"--engine onnx runs on the CPU; use --engine torch (or auto) with --device {self.device}")
        if self.precision != "fp32" and self.engine == "onnx":
            raise NoModel(
                f"--engine onnx runs in float32; use --engine torch (or auto) with --precision {self.precision}"
            )
        return where


def load_engine(
    model: str | None,
    workdir: Path,
    how: Running = Running(),  # noqa: B008 - frozen
    hinted: bool = False,
) -> tuple[Any, int]:
    """(the engine, its network input size) for ``model`` (None: the champion, DEFAULT_MODEL, in
    ``workdir``'s registry), run ``how``: on its device, in its precision, decoding at its vividness. A
    user's mistake (no such model, an engine or device that cannot run it) is a :class:`NoModel`, a
    vividness for a regression model a :class:`UsageError`: one line, exit 2. ``hinted``: the user gives
    hints, so the engine must take them: an ONNX export made without hint inputs is replaced by torch
    under ``auto`` and refused in one line under ``--engine onnx``."""
    from model.inference import with_vividness

    where = how.where()
    target = model or DEFAULT_MODEL
    local = Path(target).expanduser()
    if local.is_dir() or local.suffix == ".pt":
        net, size = _stage_folder(local, where, how)
    else:
        net, size = _registered(model, workdir, how, hinted)
    try:
        return with_vividness(net, how.vividness), size
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _stage_folder(local: Path, where: torch.device, how: Running) -> tuple[Any, int]:
    from model.colorizer import MODEL_FILE, SPEC_FILE, is_trained_folder, load_folder
    from model.inference import choose_engine, place

    folder = local if local.is_dir() else local.parent
    if not is_trained_folder(folder):
        raise NoModel(f"{local}: expected a trained stage folder with {MODEL_FILE} and {SPEC_FILE}")
    if choose_engine(how.engine, where, how.precision, has_onnx=False) == "onnx":
        raise NoModel(f"--engine onnx: {folder} is a stage folder with no ONNX export; use a registered model")
    net = load_folder(folder)
    return place(net, where, how.precision), net.spec.image_size


def _registered(model: str | None, workdir: Path, how: Running, hinted: bool = False) -> tuple[Any, int]:
    """A registered model or a run's, loaded through its pyfunc (placed as ``how`` says), and the engine
    it gives for ``how.engine`` (one that takes hints when ``hinted``)."""
    import mlflow

    from model.pyfunc import EngineError, placing
    from storage.tracking import store_missing, use_store

    target = model or DEFAULT_MODEL
    if model is None and store_missing(workdir):
        raise NoModel(
            f"no registered model {DEFAULT_MODEL}: {workdir} has no MLflow store yet; train one with "
            f"`colorize run --dataset sample --workdir {workdir}` or pass --model"
        )
    use_store(workdir)  # a moved or copied work dir's model locations point into it first
    try:
        with placing(how.device, how.precision):
            loaded = mlflow.pyfunc.load_model(target)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for "not there"
        if model is None:
            raise NoModel(
                f"no registered model {DEFAULT_MODEL} in {workdir / 'mlflow.db'}; train one with "
                f"`colorize run --dataset sample --workdir {workdir}` or pass --model"
            ) from None
        raise NoModel(f"cannot load model {target}: {str(exc).splitlines()[0]}") from None
    inner = loaded.unwrap_python_model()
    try:
        return inner.engine(how.engine, hinted), inner.spec.image_size
    except EngineError as exc:
        raise NoModel(str(exc)) from None


def registry_version(target: str, workdir: Path) -> tuple[str, str] | None:
    """(name, version) a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI points at now, or None
    when the registry cannot say (:func:`load_engine` then gives its own message)."""
    if not target.startswith("models:/"):
        return None
    from storage.tracking import store_missing, use_store

    if store_missing(workdir):
        return None  # no store: do not create one just to look
    rest = target.removeprefix("models:/")
    import mlflow

    use_store(workdir)
    client = mlflow.MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, version = rest.rsplit("/", 1)
        return (name, version) if version.isdigit() else None
    except Exception:  # noqa: BLE001 - MLflow raises several types for "not there"
        return None
