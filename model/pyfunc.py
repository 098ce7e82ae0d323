"""The MLflow pyfunc wrapper: images in, colorized images out, through model.inference.

Logged as "models from code" (this file's path, ``set_model`` below): nothing is pickled, so loading a
registered model never unpickles arbitrary objects.

Input: a uint8 array ``(B, H, W, 3)`` (RGB; only its lightness is used) or ``(B, H, W)`` grayscale.
Output: uint8 ``(B, H, W, 3)``, same size as the input. ``mlflow models serve`` accepts the same
payload as JSON (``{"inputs": [[[[r, g, b], ...]]]}``).
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np

with warnings.catch_warnings():
    # MLflow suggests type hints on predict for its own input validation; the explicit signature set at
    # logging time already describes the input, so the suggestion is noise here.
    warnings.simplefilter("ignore", UserWarning)

    class ColorizerModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context: Any) -> None:
            from model.colorizer import load_trained

            self.net = load_trained(context.artifacts["spec"], context.artifacts["weights"])
            self.spec = self.net.spec

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - MLflow infers from hints
            from model.inference import colorize

            batch = np.asarray(model_input)
            if batch.ndim == 3:  # grayscale batch
                batch = np.repeat(batch[..., None], 3, axis=-1)
            if batch.ndim != 4 or batch.shape[-1] != 3:
                raise ValueError(f"expected images of shape (B, H, W, 3) or (B, H, W), got {batch.shape}")
            batch = np.clip(batch, 0, 255).astype(np.uint8)
            return np.stack([colorize(self.net, img, self.spec.image_size) for img in batch])


mlflow.models.set_model(ColorizerModel())
