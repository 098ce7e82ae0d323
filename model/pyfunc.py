"""The MLflow pyfunc wrapper: images in, colorized images out, through model.inference.

Logged as "models from code": MLflow runs a two-line entry script (:data:`ENTRY`, written beside the
model at registration) that calls ``set_model`` on :class:`ColorizerModel`. Nothing is pickled, so loading
a registered model never unpickles arbitrary objects, and importing this module does nothing but define
the class.

Input: a uint8 array ``(B, H, W, 3)`` (RGB; only its lightness is used) or ``(B, H, W)`` grayscale.
Output: uint8 ``(B, H, W, 3)``, same size as the input. ``mlflow models serve`` accepts the same
payload as JSON (``{"inputs": [[[[r, g, b], ...]]]}``). A classification-head model takes the parameter
``vividness`` (``params={"vividness": 0.2}``, or ``"params"`` beside ``"inputs"`` in the JSON): its
decoding temperature, default the one it was evaluated at. A model trained with hints
(``train.hints``, model.hints) takes ``hints`` (a hints JSON document as a string, ``{"points": [{"x": ..,
"y": .., "color": "#RRGGBB"}]}``, points in each image's own pixels, the same for every image of the
request) and, trained with ``local+global``, ``reference`` (a colour photo's file, base64-encoded); both
default to "" (not given).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import mlflow.pyfunc
import numpy as np

ENTRY = "import mlflow.models\nfrom model.pyfunc import ColorizerModel\n\nmlflow.models.set_model(ColorizerModel())\n"
NO_ONNX = "no_onnx_export"  # model_config key: why a version was registered without its ONNX export
VIVIDNESS = "vividness"  # a classification model's parameter: the decoding temperature (``params``)
HINTS, REFERENCE = "hints", "reference"  # a hinted model's parameters: points (JSON), a palette (base64)


def hint_params(hints: str) -> tuple[str, ...]:
    """The hint parameters a model trained with ``train.hints=hints`` takes (its signature's)."""
    return {"off": (), "local": (HINTS,), "local+global": (HINTS, REFERENCE)}[hints]


# (device, precision) for the models loaded inside :func:`placing`, as values: how model.loading tells
# the pyfunc it loads in this process. A context variable, so another thread's load never sees it.
_PLACEMENT: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("placement", default=None)


class EngineError(RuntimeError):
    """The engine asked for cannot run this model (no ONNX export, no onnxruntime)."""


@contextlib.contextmanager
def placing(device: str, precision: str) -> Iterator[None]:
    """Models loaded (``mlflow.pyfunc.load_model``) inside this block put their network on ``device``
    (auto, cpu, cuda) in ``precision`` (fp32, bf16). Outside it, as in a separate serving process,
    ``$COLORIZE_DEVICE`` and ``$COLORIZE_PRECISION`` say (set by ``colorize serve --device/--precision``;
    default auto and fp32)."""
    token = _PLACEMENT.set((device, precision))
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


class ColorizerModel(mlflow.pyfunc.PythonModel):
    # MLflow wraps predict for its type-hint validation and, finding no hints, warns on every load (from
    # inside its own warning filter, so a filter here cannot silence it). The signature set at logging
    # time already describes the input; this is the switch MLflow's own ChatModel subclasses use.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from model.colorizer import load_trained
        from model.inference import DEVICE_ENV, place, placement_from_env, resolve_device

        # the loader's values (placing), else $COLORIZE_DEVICE (auto: a GPU when visible) and
        # $COLORIZE_PRECISION (fp32 or bf16), set for the server by `colorize serve --device/--precision`
        given = _PLACEMENT.get()
        device, precision = given or placement_from_env()
        where = resolve_device(device, "--device" if given else f"${DEVICE_ENV}")
        net = load_trained(context.artifacts["spec"], context.artifacts["weights"])
        self.spec = net.spec
        self.net = place(net, where, precision)
        self.onnx_path = context.artifacts.get("onnx")
        self.no_onnx_reason = (getattr(context, "model_config", None) or {}).get(NO_ONNX)
        self._onnx = None

    def engine(self, name: str = "auto", hinted: bool = False) -> Any:
        """The network to run: PyTorch, or onnxruntime on the registered ONNX export; ``auto`` as
        :func:`model.inference.choose_engine` decides for where and how the network was placed.
        ``hinted``: it must take hints, so an export made without hint inputs is PyTorch under ``auto``
        and an :class:`EngineError` under ``onnx``."""
        import importlib.util

        from model.inference import choose_engine, device_of, precision_of

        has_onnx = self.onnx_path is not None and importlib.util.find_spec("onnxruntime") is not None
        if name == "onnx" and not has_onnx:
            if self.onnx_path is None:
                why = "this model version has no ONNX export" + (
                    f" (registered without one: {self.no_onnx_reason})" if self.no_onnx_reason else ""
                )
            else:
                why = "onnxruntime is not installed"
            raise EngineError(f"--engine onnx: {why}; use --engine torch or auto")
        if choose_engine(name, device_of(self.net), precision_of(self.net), has_onnx) == "torch":
            return self.net
        if self._onnx is None:
            from model.onnx_engine import OnnxColorizer

            self._onnx = OnnxColorizer(self.onnx_path, self.spec)
        if hinted and not self._onnx.takes_hints:
            if name == "onnx":
                raise EngineError("--engine onnx: this version's ONNX export has no hint inputs; use --engine torch")
            return self.net
        return self._onnx

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - MLflow infers from hints
        from model.inference import colorize, with_vividness

        batch = np.asarray(model_input)
        if batch.ndim == 3:  # grayscale batch
            batch = np.repeat(batch[..., None], 3, axis=-1)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected images of shape (B, H, W, 3) or (B, H, W), got {batch.shape}")
        if batch.dtype.kind not in "iu" or (batch.size and (batch.min() < 0 or batch.max() > 255)):
            # clipping and casting would answer garbage for floats in 0..1 or 120.7: refuse instead
            found = str(batch.dtype)
            if batch.size and batch.dtype.kind in "iuf":
                found += f" in {batch.min()}..{batch.max()}"
            raise _invalid(f"expected uint8 pixel values (whole numbers in 0..255), got {found}")
        batch = batch.astype(np.uint8)
        params = params or {}
        guidance = self._guidance(params)
        net = self.engine("auto", hinted=bool(guidance))
        vividness = params.get(VIVIDNESS)
        if vividness is not None and vividness != self.spec.temperature:
            try:
                net = with_vividness(net, float(vividness))
            except ValueError as exc:  # out of range, or a regression model
                raise _invalid(str(exc).replace("--vividness", "vividness")) from None
        size = self.spec.image_size
        if not guidance:
            return np.stack([colorize(net, img, size) for img in batch])
        from model.hints import HintError
        from model.inference import Hinted

        out = []
        for img in batch:
            try:
                given = guidance.inputs(self.spec.hints, img.shape[1], img.shape[0], size)
            except HintError as exc:  # a point outside this image
                raise _invalid(f"params hints: {exc}") from None
            out.append(colorize(Hinted(net, given), img, size))
        return np.stack(out)

    def _guidance(self, params: dict[str, Any]) -> Any:
        """The request's hints (model.hints.Guidance), None when it gives none; a bad one is a 400."""
        if not any(params.get(name) for name in (HINTS, REFERENCE)):
            return None
        from model.hints import HintError, request_guidance

        try:
            return request_guidance(params.get(HINTS, ""), params.get(REFERENCE, ""))
        except HintError as exc:
            raise _invalid(str(exc)) from None


def _invalid(message: str) -> Exception:
    """MLflow's error for a bad request: the scoring server answers it with a 400 and this message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
