"""The upscale and prepare stages: per-shard resume, and the prepared data's contract with training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import color

from flows.config import build_config
from model.samples import decode_sample
from storage.shards import decode_png, iter_samples, shard_paths
from tasks import download, prepare
from tasks import upscale as up
from tasks.prepare import fit


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory):
    """download -> upscale -> prepare on 8 low-res and 8 high-res crops, with the real Real-ESRGAN weights."""
    wd = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(wd / "torch"))
        cfg = build_config(
            "tiny",
            ["download.lowres_crops_per_photo=1", "download.highres_crops_per_photo=1", "download.shard_maxcount=2"],
        )
        dl = download.run(download.plan(cfg.download, cfg.seed, wd)).manifest
        calls: list[int] = []
        crashed: list[bool] = []
        real = up.make_upscaler

        def flaky(*args, **kw):
            upscaler = real(*args, **kw)

            def call(images):
                calls.append(len(images))
                if len(calls) == 2 and not crashed:
                    crashed.append(True)
                    raise RuntimeError("killed mid-stage")
                return upscaler(images)

            return call

        mp.setattr(up, "make_upscaler", flaky)
        plan = up.plan(cfg.upscale, dl, wd)
        with pytest.raises(RuntimeError, match="killed"):
            up.run(plan)
        first_try = list(calls)
        calls.clear()
        upscaled = up.run(plan).manifest
        prep = prepare.run(prepare.plan(cfg.prepare, cfg.seed, dl, upscaled, wd)).manifest
    return {"cfg": cfg, "download": dl, "upscaled": upscaled, "prepared": prep, "calls": (first_try, calls)}


def test_upscale_resumes_after_a_crash_without_redoing_finished_shards(staged) -> None:
    first_try, resumed = staged["calls"]
    total = sum(staged["download"]["sets"]["lowres"].values())
    assert first_try[0] == 2  # the first shard (2 images) finished before the crash
    assert sum(resumed) == total - first_try[0]
    assert sum(staged["upscaled"]["sets"]["upscaled"].values()) == total


def test_upscaled_shards_are_x4_and_keep_keys_and_splits(staged) -> None:
    dl, upm = staged["download"], staged["upscaled"]
    for split in ("train", "val", "test"):
        lo = {s["__key__"] for s in iter_samples(shard_paths(dl, f"lowres-{split}"))}
        hi = list(iter_samples(shard_paths(upm, f"upscaled-{split}")))
        assert {s["__key__"] for s in hi} == lo
        assert all(decode_png(s["png"]).shape == (128, 128, 3) for s in hi)
    assert upm["weights"]["source"] == "ncnn" and "fp16-derived" in upm["weights"]["note"]
    assert upm["backend"] == ("torch" if torch.cuda.is_available() else "ncnn")  # the CPU default engine


def test_prepared_samples_are_normalized_lab_at_model_size(staged) -> None:
    prep = staged["prepared"]
    size = staged["cfg"].prepare.image_size
    assert prep["counts"]["train"] > 0 and prep["counts"]["test"] > 0
    samples = list(iter_samples(shard_paths(prep, "test")))
    assert len(samples) == prep["counts"]["test"]
    kinds = {json.loads(s["json"])["set"] for s in samples}
    assert kinds == {"upscaled", "highres"}
    l_norm, ab = decode_sample(samples[0])
    assert l_norm.shape == (1, size, size) and ab.shape == (2, size, size)
    assert l_norm.min() >= 0 and l_norm.max() <= 1 and ab.abs().max() <= 1
    assert set(prep["stats"]) == {"train", "val", "test"} and prep["stats"]["train"]["colorfulness"] > 0


def test_the_train_splits_ab_prior_is_in_the_prepare_manifest(staged) -> None:
    """Every train pixel counted once, in the bin of its own ab (recounted here from the samples), for
    the rebalancing weights of a classification head."""
    from model import ab_bins

    prep = staged["prepared"]
    prior = prep["ab_prior"]
    assert prior["grid"] == ab_bins.GRID and prior["bins"] == len(ab_bins.bins()) == len(prior["counts"])
    ab = torch.stack([decode_sample(s)[1] for s in iter_samples(shard_paths(prep, "train"))]).float() * 110
    assert sum(prior["counts"]) == ab[:, 0].numel() == prep["counts"]["train"] * prep["image_size"] ** 2
    recount = ab_bins.histogram(ab)  # from the stored float16 ab: a pixel on a cell's edge may move
    assert (recount - torch.tensor(prior["counts"])).abs().sum() <= 0.01 * sum(prior["counts"])
    assert prior["counts"][int(ab_bins.nearest(torch.zeros(1, 2)))] == max(prior["counts"])  # grey is commonest


def test_prepared_lab_matches_skimage_on_the_fitted_image(staged) -> None:
    """The stored Lab is the fitted RGB image's Lab (to float16 precision), not some other normalization."""
    prep, up_m = staged["prepared"], staged["upscaled"]
    size = staged["cfg"].prepare.image_size
    src = next(iter_samples(shard_paths(up_m, "upscaled-test")))
    stored = {s["__key__"]: s for s in iter_samples(shard_paths(prep, "test"))}[src["__key__"]]
    fitted = fit(decode_png(src["png"]), size, None)
    lab = color.rgb2lab(fitted)
    l_norm, ab = decode_sample(stored)
    assert np.abs(l_norm[0].numpy() * 100 - lab[..., 0]).max() < 0.06
    assert np.abs(ab.permute(1, 2, 0).numpy() * 110 - lab[..., 1:]).max() < 0.06


def test_fit_keeps_aspect_and_crops() -> None:
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 140:160] = 255  # a bar in the centre
    out = fit(wide, 32, None)
    assert out.shape == (32, 32, 3)
    assert out[:, 16].mean() > 200  # centre crop kept the bar, un-squashed
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    assert np.array_equal(fit(wide, 32, rng_a), fit(wide, 32, rng_b))


def test_upscale_is_skipped_for_high_res_only_sources() -> None:
    assert not up.has_lowres({"sets": {"highres": {"train": 5}}})
    assert up.has_lowres({"sets": {"lowres": {"train": 1, "val": 0, "test": 0}}})
    assert torch.get_num_threads() >= 1


def test_bicubic_method_upscales_x4_without_real_esrgan_weights(tmp_path, monkeypatch) -> None:
    """The baseline the second claim measures Real-ESRGAN against: PIL bicubic x4, no weights resolved
    (a missing weights file does not matter), the method recorded in the manifest."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights-here"))
    cfg = build_config("tiny", ["download.lowres_crops_per_photo=1", "download.highres_crops_per_photo=0"])
    cfg = cfg.model_copy(update={"upscale": up.Settings(method="bicubic", weights=str(tmp_path / "absent.pth"))})
    up.preflight(cfg.upscale)
    dl = download.run(download.plan(cfg.download, cfg.seed, tmp_path)).manifest
    m = up.run(up.plan(cfg.upscale, dl, tmp_path)).manifest
    assert m["method"] == "bicubic" and m["weights"] is None
    small = {s["__key__"]: decode_png(s["png"]) for s in iter_samples(shard_paths(dl, "lowres-train"))}
    big = {s["__key__"]: decode_png(s["png"]) for s in iter_samples(shard_paths(m, "upscaled-train"))}
    assert small.keys() == big.keys() and small
    for key, img in small.items():
        h, w = img.shape[:2]
        assert np.array_equal(big[key], np.asarray(Image.fromarray(img).resize((4 * w, 4 * h), Image.BICUBIC)))


def test_a_worker_finds_the_planned_weights_by_content_not_by_the_planning_machines_path(staged, monkeypatch) -> None:
    """A Dask worker on another machine has the weights in its own cache: the same sha256 is used from
    there; different weights are refused in one line rather than silently upscaling with them."""
    from model.realesrgan import WeightsInfo
    from storage.stage import StageError

    monkeypatch.setenv("TORCH_HOME", str(staged["download"]["folder"].rsplit("/download/", 1)[0] + "/torch"))
    planned = WeightsInfo(**staged["upscaled"]["weights"])
    elsewhere = WeightsInfo(planned.source, "/planning-machine/only/RealESRGAN_x4plus.pth", planned.sha256)
    assert up._weights_here(elsewhere).sha256 == planned.sha256
    assert up._weights_here(elsewhere).path != elsewhere.path
    with pytest.raises(StageError, match="are not the run's"):
        up._weights_here(WeightsInfo(planned.source, elsewhere.path, "0" * 64))
