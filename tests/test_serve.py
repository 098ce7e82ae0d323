"""Serving the champion: the ONNX export and its engine. The REST API and the web page in a real browser
need a registered champion: they are in tests/test_pipeline.py, beside the tiny pipeline run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.colorizer import Colorizer, ColorizerSpec
from model.onnx_engine import ExportMismatch, OnnxColorizer, export


def test_onnx_export_matches_eager_at_several_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Colorizer(ColorizerSpec(fusion="average", decoder_width=8, image_size=32)).eval()
    report = export(net, tmp_path / "m.onnx")
    diffs = [v for k, v in report.items() if k.startswith("max_diff_")]
    assert len(diffs) == 3 and max(diffs) <= 1e-4
    engine = OnnxColorizer(tmp_path / "m.onnx", net.spec)
    x = torch.rand(3, 1, 64, 96)  # a batch and a shape the export never saw
    with torch.no_grad():
        assert (engine(x) - net(x)).abs().max() <= 1e-4
    assert engine.spec == net.spec


def test_an_export_that_disagrees_with_eager_is_refused(tmp_path: Path, monkeypatch) -> None:
    import model.onnx_engine as onnx_engine

    monkeypatch.setattr(onnx_engine, "TOLERANCE", -1.0)  # nothing agrees with a negative tolerance
    net = Colorizer(ColorizerSpec(decoder_width=8, image_size=32)).eval()
    with pytest.raises(ExportMismatch, match="differs from eager"):
        export(net, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
