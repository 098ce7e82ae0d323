"""The training step's choices that hold on any machine: graph or eager, the batch-scaling rule and its
warm-up, and DataLoader workers that keep the data order. The graphed step itself needs a GPU: its
equality with the eager step is checked here when one is visible, and by scripts/gpu_check.sh."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from flows.config import build_config
from model.colorizer import Colorizer, ColorizerSpec
from model.samples import decode_sample16, encode_batch
from storage.errors import ConfigError
from storage.shards import ShardDataset, write_shards
from tasks import train, train_schedule
from tasks.losses import loss_fn
from tasks.train_step import StepConfig, make_optimizer, make_step, use_graphs

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_graphs_are_captured_only_for_one_cuda_process() -> None:
    assert use_graphs("auto", GPU, 1) and not use_graphs("auto", GPU, 2) and not use_graphs("auto", CPU, 1)
    assert use_graphs("on", GPU, 1) and not use_graphs("off", GPU, 1)
    with pytest.raises(ConfigError, match="cuda_graphs=on needs one CUDA process, not a CPU"):
        use_graphs("on", CPU, 1)
    with pytest.raises(ConfigError, match=r"not 2 processes \(DDP\)"):
        use_graphs("on", GPU, 2)


def test_cuda_graphs_on_without_a_gpu_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = build_config("tiny", ["train.cuda_graphs=on"])
    with pytest.raises(ConfigError, match="cuda_graphs=on"):
        train.plan(cfg.train, cfg.seed, "max", {"key": "k"}, tmp_path)


def test_the_gpu_preset_scales_the_rate_by_the_square_root_of_the_batch_and_warms_up() -> None:
    s = build_config("gpu").train
    peak = train_schedule.peak_lr(s, s.batch_size)
    assert peak == pytest.approx(s.lr * math.sqrt(s.batch_size / s.lr_batch))
    ramp = [train_schedule.lr_at(s, k, 1000, peak) for k in range(s.warmup_steps + 1)]
    assert ramp[0] == pytest.approx(peak / s.warmup_steps) and ramp[-2] == ramp[-1] == pytest.approx(peak)
    assert all(a < b for a, b in zip(ramp[:-2], ramp[1:-1], strict=True))  # rising, linearly
    assert train_schedule.lr_at(s, 1000, 1000, peak) == pytest.approx(0.0)  # cosine to 0 at the end
    linear = s.model_copy(update={"lr_scaling": "linear"})
    assert train_schedule.peak_lr(linear, 64) == pytest.approx(s.lr * 64 / s.lr_batch)
    plain = build_config("demo").train  # no scaling, no warm-up: the rate is train.lr at every step
    assert train_schedule.peak_lr(plain, 256) == plain.lr and train_schedule.lr_at(plain, 0, 10, plain.lr) == plain.lr
    assert build_config("paper").train.batch_size == 8  # the original's batch, for fidelity


def test_loader_workers_deliver_the_batches_in_the_order_of_a_single_process(tmp_path: Path) -> None:
    rgb = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    _, fields = encode_batch(rgb)
    write_shards(tmp_path, "train", ({"__key__": f"{i:04d}", "lab.npy": f} for i, f in enumerate(fields)), maxcount=7)
    shards = sorted(tmp_path.glob("train-*.tar"))

    def batches(workers: int) -> list[torch.Tensor]:
        ds = ShardDataset(shards, decode_sample16, seed=3, buffer=16, batch=4)
        ds.set_epoch(1, skip=8)
        loader = DataLoader(ds, batch_size=4, drop_last=True, num_workers=workers)
        return [ab for _, ab in loader]

    one, two = batches(0), batches(2)
    assert len(one) == 8 and one[0].dtype == torch.float16
    assert len(two) == len(one) and all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_graphed_step_trains_like_the_eager_step() -> None:
    """Same batches, same start: the losses of ten graphed steps (three eager warm-up steps, the capture,
    the replays) follow the eager step's within float noise of the kernels' choices."""
    torch.manual_seed(0)
    spec = ColorizerSpec(fusion="max", decoder_width=16, image_size=64)
    nets = [Colorizer(spec).to(GPU, memory_format=torch.channels_last).train() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    batches = [(torch.rand(8, 1, 64, 64), torch.rand(8, 2, 64, 64) - 0.5, torch.rand(8) < 0.5) for _ in range(10)]
    losses = []
    for net, graphs in zip(nets, (False, True), strict=True):
        step = make_step(net, make_optimizer(net, 1e-3, capturable=graphs), loss_fn("mse"), StepConfig(), graphs)
        losses.append(torch.stack([step(*(t.pin_memory() for t in b)) for b in batches]).cpu())
    assert torch.allclose(losses[0], losses[1], rtol=1e-3, atol=1e-5)


def test_the_train_bench_fills_a_batch_larger_than_the_sample_split_and_steps(tmp_path: Path, monkeypatch) -> None:
    """``bench/train.py --batch 64``: the sample photos' training split holds fewer crops than one batch;
    the bench's loader cycles over epochs instead of looping forever, and the stage's step runs on it."""
    import importlib.util

    from flows.config import build_config
    from tasks import download, prepare

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).parents[1] / "bench" / "train.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train", bench)  # its dataclasses look themselves up there
    spec.loader.exec_module(bench)
    cfg = build_config("tiny")
    dl = download.run(download.plan(cfg.download, cfg.seed, tmp_path)).manifest
    prep = prepare.run(prepare.plan(cfg.prepare, cfg.seed, dl, None, tmp_path)).manifest
    assert prep["counts"]["train"] < 64
    batches = bench.stage_batches(prep, 64, CPU)
    net = Colorizer(ColorizerSpec(fusion="max", decoder_width=8, image_size=32)).train()
    step = bench.stage_step(net, train.Settings(batch_size=64, log_every=1), bench.World())
    for _ in range(2):
        l_norm, ab = next(batches)
        assert l_norm.shape == (64, 1, 32, 32) and ab.shape == (64, 2, 32, 32)
        step((l_norm, ab))


def test_the_hint_layers_learn_at_their_own_multiple_of_the_rate_and_nothing_else_moves() -> None:
    """train.hint_lr_scale: a second Adam group for the hint layers, kept at its multiple by the schedule;
    without hints, or at 1, one group over every parameter in the order of before."""
    from tasks.train_step import set_lr

    plain = Colorizer(ColorizerSpec(decoder_width=8, image_size=32))
    assert len(make_optimizer(plain, 1e-3, hint_lr_scale=10).param_groups) == 1
    hinted = Colorizer(ColorizerSpec(decoder_width=8, image_size=32, hints="local+global"))
    (one,) = make_optimizer(hinted, 1e-3).param_groups
    assert [id(p) for p in one["params"]] == [id(p) for p in hinted.parameters()]
    opt = make_optimizer(hinted, 1e-3, hint_lr_scale=10)
    main, hint = opt.param_groups
    names = {id(p): n for n, p in hinted.named_parameters()}
    assert all(names[id(p)].startswith(("hint_local.", "hint_global.")) for p in hint["params"])
    assert len(main["params"]) + len(hint["params"]) == len(list(hinted.parameters()))
    set_lr(opt, 0.002)
    assert main["lr"] == 0.002 and math.isclose(hint["lr"], 0.02)
