"""The ensemble colorizer network and the training stage (real ResNet50 + DenseNet121, small inputs)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torchvision.models import densenet121, resnet50

from flows.config import build_config
from model import pretrained
from model.colorizer import Colorizer, ColorizerSpec, ResNetEncoder, adapt_stem, build
from model.colorizer import load_folder as load_model
from storage.shards import shard_paths
from tasks import download, losses, prepare, train, train_loop, train_schedule
from tasks.train_step import DivergedError


@pytest.mark.parametrize("fusion", ["concat", "average", "max"])
def test_output_is_ab_at_input_size_for_each_variant(fusion: str) -> None:
    net = Colorizer(ColorizerSpec(fusion=fusion, decoder_width=16)).eval()
    with torch.no_grad():
        for side in (64, 128, 224):
            out = net(torch.rand(1, 1, side, side))
            assert out.shape == (1, 2, side, side)
            assert out.abs().max() <= 1  # tanh: the range of ab/110
        assert net(torch.rand(2, 1, 64, 96)).shape == (2, 2, 64, 96)  # non-square, multiples of 32


def test_input_side_not_multiple_of_32_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        Colorizer(ColorizerSpec(decoder_width=8))(torch.rand(1, 1, 48, 64))


@pytest.mark.parametrize("fusion", ["concat", "average", "max"])
def test_gradients_reach_both_encoders_and_every_fusion_block(fusion: str) -> None:
    net = Colorizer(ColorizerSpec(fusion=fusion, decoder_width=16)).train()
    net(torch.rand(2, 1, 64, 64)).square().mean().backward()
    assert net.resnet.stem[0].weight.grad.abs().sum() > 0
    assert net.densenet.stem[0].weight.grad.abs().sum() > 0
    assert net.resnet.layers[-1][-1].conv3.weight.grad.abs().sum() > 0
    assert net.densenet.blocks[-1].denselayer16.conv2.weight.grad.abs().sum() > 0
    for block in net.fusions:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_stem_adaptation_sums_the_rgb_kernels() -> None:
    state = resnet50(weights=None).state_dict()
    enc = ResNetEncoder(state)
    assert enc.stem[0].weight.shape == (64, 1, 7, 7)
    assert torch.allclose(enc.stem[0].weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    # For a grey image fed as R = G = B, the adapted conv responds exactly like the RGB one.
    rgb = torch.nn.Conv2d(3, 8, 3, bias=False)
    grey = torch.rand(1, 1, 9, 9)
    assert torch.allclose(adapt_stem(rgb)(grey), rgb(grey.repeat(1, 3, 1, 1)), atol=1e-6)


def _fake_torchvision_file(name: str, state: dict, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Save ``state`` under a torchvision-style name whose hash prefix matches, and point URLS at it."""
    tmp = folder / "tmp.pth"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = folder / f"{name}-{prefix}.pth"
    tmp.rename(path)
    monkeypatch.setitem(pretrained.URLS, name, f"http://127.0.0.1:9/{path.name}")
    return path


def test_pretrained_weights_load_from_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    r_state = resnet50(weights=None).state_dict()
    d_state = densenet121(weights=None).state_dict()
    # torchvision's real densenet file uses the old 'norm.1' key style: the loader must remap it
    old_style = {
        k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v
        for k, v in d_state.items()
        if not k.endswith("num_batches_tracked")
    }  # the 2017 file predates this buffer
    _fake_torchvision_file("resnet50", r_state, folder, monkeypatch)
    _fake_torchvision_file("densenet121", old_style, folder, monkeypatch)
    net, report = build(ColorizerSpec(decoder_width=8), pretrained=True, allow_download=False)
    assert report.used and "resnet50" in report.detail
    assert torch.allclose(net.resnet.stem[0].weight, r_state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(
        net.densenet.blocks[0].denselayer1.conv2.weight, d_state["features.denseblock1.denselayer1.conv2.weight"]
    )


def test_missing_pretrained_weights_train_from_scratch_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        _, report = build(ColorizerSpec(decoder_width=8), pretrained=True, allow_download=False)
    assert not report.used and report.detail.startswith("from scratch")
    assert "TRAINING FROM SCRATCH" in caplog.text
    tampered = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    tampered.parent.mkdir(parents=True)
    tampered.write_bytes(b"not the weights")
    assert "sha256 prefix" in pretrained.locate("resnet50", allow_download=False).reason


@pytest.mark.slow  # 60 training steps
def test_tiny_preset_overfits_a_fixed_batch() -> None:
    """The wiring learns: 40 Adam steps on 4 images cut the ab loss tenfold. The images are smooth, as
    natural images' ab is: the decoder's finest skip is at 1/4 scale, so per-pixel noise is not learnable
    (nor needed: inference keeps the photo's own full-resolution L)."""
    torch.manual_seed(0)
    net = Colorizer(ColorizerSpec(fusion="concat", decoder_width=16)).train()
    l_norm = torch.nn.functional.interpolate(torch.rand(4, 1, 4, 4), size=32, mode="bilinear", align_corners=False)
    ab = torch.tanh(torch.cat([l_norm - 0.5, 0.5 - l_norm], 1) * 2)  # colour as a function of lightness
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(net(l_norm), ab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Small prepared data (low-res crops resized directly, no Real-ESRGAN: this is about training)."""
    wd = tmp_path_factory.mktemp("data")
    cfg = build_config("tiny")
    dl = download.run(download.plan(cfg.download, cfg.seed, wd)).manifest
    return prepare.run(prepare.plan(cfg.prepare, cfg.seed, dl, None, wd)).manifest


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    ("head", "hints"), [("regression", "off"), ("classification", "off"), ("regression", "local+global")]
)
def test_resumed_training_ends_with_the_same_weights(
    prepared: dict, tmp_path: Path, monkeypatch, head: str, hints: str
) -> None:
    """Killed after step 3 (checkpoint at 2), resumed: bitwise the weights of an uninterrupted run, the
    simulated user's hints included (their generator is in the checkpoint: drawn afresh, steps 3-5
    would see other hints and end elsewhere)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    sets = ["train.max_steps=5", "train.checkpoint_every=2", "train.variants=max", f"train.head={head}"]
    sets += [f"train.hints={hints}"] + (["train.hint_lr_scale=10"] if hints != "off" else [])  # two Adam groups
    cfg = build_config("tiny", sets)
    straight = train.run(train.plan(cfg.train, cfg.seed, "max", prepared, tmp_path / "a")).manifest

    plan_b = train.plan(cfg.train, cfg.seed, "max", prepared, tmp_path / "b")

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train.run(plan_b, on_step=stop_at_3)
    assert (tmp_path / "b" / "train" / f"{plan_b['key']}.partial" / "scratch" / "checkpoint.pt").exists()
    resumed = train.run(plan_b).manifest
    a, b = load_model(Path(straight["folder"])).state_dict(), load_model(Path(resumed["folder"])).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["steps"] == resumed["steps"] == 5
    assert resumed["mlflow_run_id"]  # one MLflow run, continued after the crash
    assert resumed["spec"]["head"] == head
    if hints != "off":  # the hint layers, zero at the start, learned from the simulated points and palettes
        assert resumed["spec"]["hints"] == hints
        assert any(k.startswith("hint_local") and b[k].abs().sum() > 0 for k in b)
        assert any(k.startswith("hint_global") and b[k].abs().sum() > 0 for k in b)


def test_truncated_checkpoint_is_detected_and_training_restarts(prepared: dict, tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = build_config("tiny", ["train.max_steps=3", "train.checkpoint_every=1"])
    plan = train.plan(cfg.train, cfg.seed, "concat", prepared, tmp_path)

    def stop_at_2(step: int) -> None:
        if step == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train.run(plan, on_step=stop_at_2)
    ckpt = tmp_path / "train" / f"{plan['key']}.partial" / "scratch" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        manifest = train.run(plan).manifest
    assert "unreadable" in caplog.text and manifest["steps"] == 3


def test_cosine_schedule_anneals_from_lr_to_zero() -> None:
    s = build_config("tiny", ["train.schedule=cosine", "train.lr=0.01"]).train
    assert [round(train_schedule.lr_at(s, k, 4), 6) for k in range(5)] == [0.01, 0.008536, 0.005, 0.001464, 0.0]
    assert train_schedule.lr_at(build_config("tiny").train, 3, 4) == build_config("tiny").train.lr


def test_keep_best_keeps_the_lowest_validation_epoch_and_resumes_exactly(
    prepared: dict, tmp_path: Path, monkeypatch
) -> None:
    """Early stopping on the validation split, under the cosine schedule: the kept weights are the
    epoch end with the lowest validation MSE (recomputed here from the saved model), and an interrupted
    run keeps the same weights as an uninterrupted one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    sets = ["train.max_steps=null", "train.epochs=3", "train.schedule=cosine", "train.keep=best", "train.lr=0.02"]
    cfg = build_config("tiny", sets)
    straight = train.run(train.plan(cfg.train, cfg.seed, "max", prepared, tmp_path / "a")).manifest
    history = json.loads((Path(straight["folder"]) / "history.json").read_text())
    vals = [v for _, v in history["val"]]
    assert len(vals) == 3 and straight["val_loss"] == min(vals)
    assert straight["kept_step"] == history["val"][vals.index(min(vals))][0]
    net = load_model(Path(straight["folder"]))
    assert train_loop.validate(net, shard_paths(prepared, "val"), 4, False)[0] == pytest.approx(min(vals), rel=1e-4)

    plan_b = train.plan(cfg.train, cfg.seed, "max", prepared, tmp_path / "b")

    def stop_late(step: int) -> None:
        if step == straight["steps"] - 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train.run(plan_b, on_step=stop_late)
    resumed = train.run(plan_b).manifest
    a, b = net.state_dict(), load_model(Path(resumed["folder"])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["kept_step"] == straight["kept_step"]


def test_a_nan_at_step_k_stops_the_run_before_anything_diverged_is_written_and_the_rerun_resumes(
    prepared: dict, tmp_path: Path, monkeypatch, caplog
) -> None:
    """The losses are read at the loop's boundaries only (no host sync per step): a NaN at step 3 is found
    at step 4's checkpoint, which is then never written; the rerun resumes from step 2's and ends where an
    uninterrupted run ends."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = build_config("tiny", ["train.max_steps=5", "train.checkpoint_every=2", "train.log_every=5"])
    straight = train.run(train.plan(cfg.train, cfg.seed, "max", prepared, tmp_path / "a")).manifest
    plan = train.plan(cfg.train, cfg.seed, "max", prepared, tmp_path / "b")
    real, calls = losses.loss_fn, {"n": 0}

    def nan_at_third_step(kind: str, colour_weight: float = 0.5) -> losses.Criterion:
        criterion = real(kind, colour_weight)

        def poisoned(pred: torch.Tensor, true: torch.Tensor, l_norm: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return criterion(pred, true, l_norm) * (math.nan if calls["n"] == 3 else 1.0)

        return poisoned

    monkeypatch.setattr(losses, "loss_fn", nan_at_third_step)
    with pytest.raises(DivergedError, match="training diverged at step 3: the loss is nan"):
        train.run(plan)
    assert calls["n"] == 4  # found at the next boundary, not at the step itself
    partial = tmp_path / "b" / "train" / f"{plan['key']}.partial"
    assert not (tmp_path / "b" / "train" / plan["key"]).exists()
    state = torch.load(partial / "scratch" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    monkeypatch.setattr(losses, "loss_fn", real)
    with caplog.at_level(logging.INFO, logger="tasks.train_state"):
        resumed = train.run(plan).manifest
    assert "resuming from step 2 of 5" in caplog.text
    a, b = load_model(Path(straight["folder"])).state_dict(), load_model(Path(resumed["folder"])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((Path(resumed["folder"]) / "history.json").read_text())
    assert [s for s, _ in history["train"]] == [1, 2, 3, 4, 5]


def test_the_classification_head_predicts_logits_at_half_size_and_decodes_to_ab(tmp_path: Path) -> None:
    """Logits over the ab bins at S/2 for the loss; ``forward`` decodes them to ab/110 at S by the
    annealed mean (the same as model.ab_bins.annealed_mean, then upsampled); the bins travel in the
    state dict, so a saved model loads without recomputing them."""
    from model import ab_bins
    from model.colorizer import load_folder, save_trained

    torch.manual_seed(0)
    q = len(ab_bins.bins())
    net = Colorizer(ColorizerSpec(fusion="max", decoder_width=16, head="classification", classes=q)).eval()
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        logits = net(x, raw=True)
        assert logits.shape == (2, q, 32, 48)
        for t in (1.0, 0.38, 0.05):
            ab = ab_bins.annealed_mean(torch.softmax(logits, 1), t)
            up = torch.nn.functional.interpolate(ab, scale_factor=2, mode="bilinear", align_corners=False) / 110
            assert torch.allclose(net(x, t), up, atol=1e-5)
        assert net(x).shape == (2, 2, 64, 96) and torch.equal(net(x), net(x, net.spec.temperature))
    save_trained(net, tmp_path)
    back = load_folder(tmp_path)
    assert back.spec == net.spec and torch.equal(back.bins, ab_bins.bins())
    with torch.no_grad():
        assert torch.equal(back(x, 0.2), net(x, 0.2))
    with pytest.raises(ValueError, match="unknown head"):
        ColorizerSpec(head="softmax")


@pytest.mark.slow  # an ONNX export and its parity check
def test_the_classification_heads_onnx_export_takes_the_temperature_as_an_input(tmp_path: Path) -> None:
    from model.onnx_engine import TEMPERATURE, OnnxColorizer, export

    torch.manual_seed(0)
    spec = ColorizerSpec(fusion="average", decoder_width=16, image_size=64, head="classification", classes=261)
    net = Colorizer(spec).eval()
    report = export(net, tmp_path / "m.onnx")  # the parity check at the model's T and at T = 1
    assert report["max_rgb_diff"] <= 1 and any(k.endswith("_t1") for k in report)
    engine = OnnxColorizer(tmp_path / "m.onnx", spec)
    assert engine.decodes and TEMPERATURE in {i.name for i in engine.session.get_inputs()}
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert (engine(x, 0.2) - net(x, 0.2)).abs().max() < 2e-3
        assert (engine(x, 0.2) - engine(x, 1.0)).abs().max() > 1e-3  # the input is used, not baked in
