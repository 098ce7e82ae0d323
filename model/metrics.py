"""Image-quality metrics with their conventions stated, shared by the prepare and evaluate stages.

Conventions: images are float RGB in [0, 1], HxWx3 (numpy) unless noted. PSNR and SSIM are
scikit-image's with ``data_range=1.0`` on RGB rebuilt from the true L and the predicted ab, so a
grayscale prediction (ab = 0) already scores well; always compare against that baseline.
Colourfulness is Hasler & Suesstrunk (2003) on 8-bit-scaled RGB (their paper's units).
"""

from __future__ import annotations

import numpy as np


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk's M^(3): sigma_rgyb + 0.3 * mu_rgyb on RGB scaled to [0, 255]."""
    x = rgb.astype(np.float64) * (255.0 if rgb.dtype != np.uint8 and rgb.max() <= 1.0 else 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
