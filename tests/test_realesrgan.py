"""Real-ESRGAN: the weight resolution order, the real ncnn-derived network, both engines against RealESRGANer's
own output (tests/data/realesrgan_reference.npz, written by bench/upscale.py --write-reference)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from model import realesrgan as resr
from model import upscaler as ups
from model.metrics import edge_f1
from model.ncnn import NcnnFormatError, read_convolutions, write_fp32_bin
from model.upscaler import NcnnUpscaler
from storage.fetch import DownloadError


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, resr.WeightsInfo]:
    """The real network from the shipped ncnn fp16 weights, converted once for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch")))
        info = resr.resolve_weights(allow_download=False)
        net, _ = resr.load_upscaler(info)
    return net, info


@pytest.fixture(scope="module")
def ncnn_engine(converted, tmp_path_factory: pytest.TempPathFactory) -> NcnnUpscaler:
    """The CPU engine on the same weights, its fp32 blob written into a fresh cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-ncnn")))
        return NcnnUpscaler(converted[1], threads=2)


REFERENCE = Path(__file__).parent / "data" / "realesrgan_reference.npz"


def _save_random_weights(path: Path) -> dict[str, torch.Tensor]:
    """An untrained x4plus in the official release's layout (``params_ema``, basicsr's layer names)."""
    convs = [m for m in resr.rrdbnet().modules() if isinstance(m, torch.nn.Conv2d)]
    sd = {}
    for name, conv in zip(resr.conv_names(), convs, strict=True):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = conv.weight.detach(), conv.bias.detach()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": sd}, path)
    return sd


def test_explicit_path_wins_and_loads_strictly(tmp_path: Path, torch_home: Path) -> None:
    sd = _save_random_weights(tmp_path / "mine.pth")
    _save_random_weights(torch_home / resr.WEIGHTS_NAME)  # present, but the explicit path comes first
    net, info = resr.load_upscaler(resr.resolve_weights(tmp_path / "mine.pth"))
    assert info.source == "explicit"
    assert torch.equal(net.state_dict()["model.0.weight"], sd["conv_first.weight"])  # spandrel's name for it
    assert torch.equal(net.state_dict()["model.10.bias"], sd["conv_last.bias"])


def test_explicit_path_that_is_missing_or_wrong_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(resr.WeightsError, match="no such file"):
        resr.resolve_weights(tmp_path / "nope.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(resr.WeightsError, match="not a RealESRGAN_x4plus state dict") as exc:
        resr.load_upscaler(resr.resolve_weights(tmp_path / "wrong.pth"))
    assert "\n" not in str(exc.value)
    sd = _save_random_weights(tmp_path / "x4plus.pth")
    torch.save({"params_ema": {k: v for k, v in sd.items() if not k.startswith("body.22.")}}, tmp_path / "22.pth")
    with pytest.raises(resr.WeightsError, match="22.pth is not a RealESRGAN_x4plus.*not x4plus"):
        resr.load_upscaler(resr.resolve_weights(tmp_path / "22.pth"))  # an ESRGAN, but 22 blocks deep


def test_hub_cache_is_used_before_any_download(torch_home: Path) -> None:
    _save_random_weights(torch_home / resr.WEIGHTS_NAME)
    info = resr.resolve_weights(url="http://127.0.0.1:9/never-asked")
    assert info.source == "cache" and Path(info.path) == torch_home / resr.WEIGHTS_NAME


def test_download_with_right_checksum_is_cached(torch_home: Path, tmp_path: Path, http_server) -> None:
    _save_random_weights(tmp_path / "w.pth")
    body = (tmp_path / "w.pth").read_bytes()
    url = http_server.add("/RealESRGAN_x4plus.pth", body)
    info = resr.resolve_weights(url=url, sha256=hashlib.sha256(body).hexdigest())
    assert info.source == "download"
    assert (torch_home / resr.WEIGHTS_NAME).read_bytes() == body
    resr.load_upscaler(info)  # strict load of what was downloaded


def test_download_with_wrong_checksum_is_rejected_not_cached_and_falls_back(torch_home: Path, http_server) -> None:
    url = http_server.add("/RealESRGAN_x4plus.pth", b"not the weights")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        from storage.fetch import download

        download(url, torch_home / resr.WEIGHTS_NAME, sha256=resr.WEIGHTS_SHA256, retries=0, progress=False)
    assert not (torch_home / resr.WEIGHTS_NAME).exists()
    info = resr.resolve_weights(url=url, timeout=5)
    assert info.source == "ncnn" and "fp16-derived" in info.note
    assert not (torch_home / resr.WEIGHTS_NAME).exists()
    assert (torch_home / resr.NCNN_CACHE_NAME).exists()  # the conversion is cached under its own name


@pytest.mark.slow
def test_ncnn_weights_map_onto_every_convolution(converted) -> None:
    net, info = converted
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(resr.conv_names()) == 351
    assert sum(p.numel() for p in net.parameters()) == resr.N_PARAMETERS
    sd = resr.load_state(Path(info.path))
    assert set(sd) == {f"{n}.{k}" for n in resr.conv_names() for k in ("weight", "bias")}  # the official layout
    assert all(sd[k].abs().sum() > 0 for k in sd if k.endswith("weight"))  # nothing left at zero
    for name, conv in zip(resr.conv_names(), convs, strict=True):  # each in its place, forward order
        assert torch.equal(conv.weight, sd[f"{name}.weight"]) and torch.equal(conv.bias, sd[f"{name}.bias"])


def _edge_energy(rgb: np.ndarray) -> float:
    gy, gx = np.gradient(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    return float(np.hypot(gx, gy).mean())


@pytest.fixture(scope="module")
def reference(converted) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and ``RealESRGANer.enhance``'s output on them (one image at a time, the library's CPU
    defaults), computed with basicsr on the same ncnn-derived weights: the reference both engines meet."""
    ref = np.load(REFERENCE)
    assert str(ref["weights_sha256"]) == converted[1].sha256, (
        "the shipped ncnn weights changed: rerun bench/upscale.py --write-reference (the bench extra)"
    )
    return ref["inputs"], ref["reference"]


def _on_nhwc(upscale_fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray) -> np.ndarray:
    """Any engine (uint8 ``(B, 3, H, W)`` in and out) applied to ``(B, H, W, 3)`` arrays."""
    return upscale_fn(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
def test_real_network_restores_edge_structure_that_bicubic_loses(converted) -> None:
    """On real photo crops, box-downscaled 4x then upscaled: Real-ESRGAN's edge map is closer to the
    original's than bicubic's (edge F1), and so is its edge energy (bicubic blurs). Pixel SSIM does
    *not* favour it (it invents texture); the bench prints both."""
    net, _ = converted
    hr = [
        data.astronaut()[100:228, 180:308],
        data.coffee()[150:278, 200:328],
        data.chelsea()[60:188, 150:278],
        data.rocket()[200:328, 250:378],
    ]
    lr = [np.asarray(Image.fromarray(h).resize((32, 32), Image.Resampling.BOX)) for h in hr]
    sr = _on_nhwc(lambda x: resr.upscale(net, x), np.stack(lr))
    assert sr.shape == (4, 128, 128, 3)
    gaps_sr, gaps_bic, f1_sr, f1_bic = [], [], [], []
    for h, low, s in zip(hr, lr, sr, strict=True):
        bic = np.asarray(Image.fromarray(low).resize((128, 128), Image.Resampling.BICUBIC))
        f1_sr.append(edge_f1(s, h))
        f1_bic.append(edge_f1(bic, h))
        assert f1_sr[-1] > f1_bic[-1]
        e_orig = _edge_energy(h)
        gaps_sr.append(abs(_edge_energy(s) - e_orig))
        gaps_bic.append(abs(_edge_energy(bic) - e_orig))
        assert gaps_sr[-1] < gaps_bic[-1]
        assert np.abs(s.astype(float).mean((0, 1)) - h.astype(float).mean((0, 1))).max() < 12  # colours kept
    assert np.mean(f1_sr) > np.mean(f1_bic) + 0.05
    assert np.mean(gaps_sr) < 0.75 * np.mean(gaps_bic)


@pytest.mark.slow
def test_batched_path_matches_realesrganer_within_one_level(converted, reference) -> None:
    """The PyTorch engine (spandrel's RRDBNet, a batch in one call) on real photo crops and on noise."""
    images, ref = reference
    ours = _on_nhwc(lambda x: resr.upscale(converted[0], x), images)
    assert ours.shape == ref.shape == (3, 128, 128, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert (ours == ref).mean() > 0.99


@pytest.mark.slow
def test_ncnn_engine_matches_realesrganer_within_one_level(reference, ncnn_engine: NcnnUpscaler) -> None:
    """The CPU default engine (Winograd convolutions, fp32) on the same images."""
    images, ref = reference
    ours = _on_nhwc(ncnn_engine, images)
    assert ours.shape == ref.shape == (3, 128, 128, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.slow
def test_ncnn_blob_carries_exactly_the_resolved_weights(converted, tmp_path: Path, monkeypatch) -> None:
    """All 351 convolutions of the fp32 blob read back equal to the state dict it was written from."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, info = converted
    param, blob = ups.ncnn_model(info)
    assert blob.name.startswith(f"RealESRGAN_x4plus-{info.sha256[:16]}")  # keyed by the weights
    state = resr.load_state(Path(info.path))
    convs = read_convolutions(param, blob)
    assert len(convs) == 351
    for name, conv in zip(resr.conv_names(), convs, strict=True):
        assert np.array_equal(conv.weight, state[f"{name}.weight"].numpy())
        assert np.array_equal(conv.bias, state[f"{name}.bias"].numpy())
    with pytest.raises(NcnnFormatError, match="convolutions"):
        write_fp32_bin(param, [(c.weight, c.bias) for c in convs[:-1]], tmp_path / "short.bin")


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ups.torch.cuda, "is_available", lambda: False)
    assert ups.choose_backend("auto") == "ncnn"
    assert ups.choose_backend("torch") == "torch"
    monkeypatch.setattr(ups.torch.cuda, "is_available", lambda: True)
    assert ups.choose_backend("auto") == "torch"  # a GPU: batched PyTorch
    monkeypatch.setattr(ups.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(resr.WeightsError, match="pip install ncnn"):
        ups.choose_backend("ncnn")
