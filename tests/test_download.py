"""The download stage for every source, with the network sources served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.config import build_config
from flows.pipeline import configure_run
from storage.archives import UnsafeArchiveError, extract
from storage.errors import ConfigError
from storage.fetch import DownloadError, download
from storage.shards import decode_png, iter_samples, shard_paths
from tasks import download as download_stage


def _run(tmp_path: Path, dataset: str, *overrides: str, path: Path | None = None, preset: str = "tiny"):
    cfg = configure_run(dataset, preset, list(overrides), str(path) if path else None)
    return download_stage.run(download_stage.plan(cfg.download, cfg.seed, tmp_path))


def _sources(manifest: dict, set_name: str, split: str) -> set[str]:
    return {
        json.loads(s["json"])["scene" if "scene" in json.loads(s["json"]) else "source"]
        for s in iter_samples(shard_paths(manifest, f"{set_name}-{split}"))
    }


# ---------------------------------------------------------------- sample
def test_sample_split_never_shares_a_source_photo(tmp_path: Path) -> None:
    m = _run(tmp_path, "sample").manifest
    assert m["splits"]["motorcycle"] in ("train", "val", "test")  # the stereo pair is one scene
    for set_name in ("lowres", "highres"):
        scenes = {split: _sources(m, set_name, split) for split in ("train", "val", "test")}
        assert scenes["train"] and scenes["val"] and scenes["test"]
        assert not (scenes["train"] & scenes["test"]) and not (scenes["train"] & scenes["val"])
        assert not (scenes["val"] & scenes["test"])
    lo = decode_png(next(iter_samples(shard_paths(m, "lowres-train")))["png"])
    hi = decode_png(next(iter_samples(shard_paths(m, "highres-train")))["png"])
    assert lo.shape == (32, 32, 3) and hi.shape == (64, 64, 3)
    cfg = build_config("tiny")
    assert m["sets"]["lowres"]["train"] + m["sets"]["lowres"]["val"] + m["sets"]["lowres"]["test"] == (
        8 * cfg.download.lowres_crops_per_photo
    )


def test_sample_is_deterministic_for_a_seed_and_changes_with_it(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "sample").manifest
    b = _run(tmp_path / "b", "sample").manifest
    c = _run(tmp_path / "c", "sample", "seed=7").manifest
    assert a["content"] == b["content"] and a["key"] == b["key"]
    assert c["content"] != a["content"]


def test_sizes_are_configurable(tmp_path: Path) -> None:
    m = _run(tmp_path, "sample", "download.lowres_crops_per_photo=1", "download.highres_crops_per_photo=0").manifest
    assert sum(m["sets"]["lowres"].values()) == 8 and "highres" not in m["sets"]


# ---------------------------------------------------------------- folder
def _save(path: Path, im: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)


def test_folder_handles_modes_and_skips_bad_files(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    _save(photos / "a.jpg", rgb)
    _save(photos / "sub" / "b.png", rgb.convert("RGBA"))
    _save(photos / "c.webp", rgb)
    _save(photos / "d.tiff", rgb.convert("CMYK"))
    _save(photos / "e.png", rgb.convert("P"))
    _save(photos / "small.png", rgb.resize((30, 20)))  # below the low-res threshold
    _save(photos / "gray.png", rgb.convert("L"))
    _save(photos / "gray16.png", Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)))
    (photos / "notes.txt").write_text("not an image")
    (photos / "fake.jpg").write_bytes(b"this is not a jpeg")
    good = io.BytesIO()
    rgb.save(good, format="PNG")
    (photos / "truncated.png").write_bytes(good.getvalue()[:200])
    (photos / "empty.png").write_bytes(b"")

    m = _run(tmp_path / "w", "folder", path=photos).manifest
    skipped = {s["file"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"fake.jpg", "truncated.png", "empty.png", "gray.png", "gray16.png"}
    assert "grayscale" in skipped["gray.png"] and "empty" in skipped["empty.png"]
    assert m["usable"] == 6
    assert sum(m["sets"]["lowres"].values()) == 1 and sum(m["sets"]["highres"].values()) == 5
    assert set(m["splits"].values()) == {"train", "val", "test"}


def test_folder_cuts_several_crops_per_photo_all_in_the_photos_split(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c", "d", "e"):
        _save(photos / f"{name}.png", Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)))
    _save(photos / "tiny.png", Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)))
    opts = ["download.folder_crops_per_photo=4", "download.folder_photo_side=96", "download.highres_size=64"]
    m = _run(tmp_path / "w", "folder", *opts, path=photos).manifest
    assert sum(m["sets"]["highres"].values()) == 5 * 4 and sum(m["sets"]["lowres"].values()) == 1
    seen = {}
    for split in ("train", "val", "test"):
        for shard in shard_paths(m, f"highres-{split}"):
            for sample in iter_samples([shard]):
                meta = json.loads(sample["json"])
                assert decode_png(sample["png"]).shape == (64, 64, 3)
                assert seen.setdefault(meta["source"], split) == split == m["splits"][meta["source"]]
    assert len(seen) == 5
    again = _run(tmp_path / "w2", "folder", *opts, path=photos).manifest
    assert again["content"] == m["content"]  # seeded: the same crops

    # The second claim's setting: the same crops, train and val shrunk to 32x32 (to be upscaled), test
    # left full size, so Real-ESRGAN and bicubic are scored on the very photos the fusion study uses.
    low = _run(tmp_path / "w3", "folder", *opts, "download.folder_lowres=true", path=photos).manifest

    def crops(manifest: dict, kind: str, split: str) -> dict[str, np.ndarray]:
        return {s["__key__"]: decode_png(s["png"]) for s in iter_samples(shard_paths(manifest, f"{kind}-{split}"))}

    assert not any(low["sets"]["highres"].get(split) for split in ("train", "val"))
    for split in ("train", "val"):
        small, full = crops(low, "lowres", split), crops(m, "highres", split)
        assert small.keys() >= full.keys() and full
        for key, crop in full.items():
            expected = np.asarray(Image.fromarray(crop).resize((32, 32), Image.Resampling.BOX))
            assert np.array_equal(small[key], expected)
    test_full, test_low = crops(m, "highres", "test"), crops(low, "highres", "test")
    assert test_full and test_full.keys() == test_low.keys()
    assert all(np.array_equal(test_full[k], test_low[k]) for k in test_full)


def test_folder_of_only_bad_files_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="none of the 1 images") as exc:
        _run(tmp_path / "w", "folder", path=tmp_path / "p")
    assert "\n" not in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images found"):
        _run(tmp_path / "w", "folder", path=tmp_path / "empty")


# ---------------------------------------------------------------- cifar10 (CIFAR's own python format)
def _cifar_archive(n_train_per_batch: int = 6, n_test: int = 5) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            n = n_test if name == "test_batch" else n_train_per_batch
            batch = {
                "batch_label": name,
                "labels": list(rng.integers(0, 10, n)),
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "filenames": [f"{i}.png" for i in range(n)],
            }
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_cifar10_end_to_end_from_local_server(tmp_path: Path, http_server) -> None:
    body = _cifar_archive()
    url = http_server.add("/cifar-10-python.tar.gz", body)
    md5 = hashlib.md5(body).hexdigest()
    m = _run(
        tmp_path, "cifar10", f"download.cifar10_url={url}", f"download.cifar10_md5={md5}", "download.limit=null"
    ).manifest
    assert m["sets"] == {"lowres": {"train": 27, "val": 3, "test": 5}}
    img = decode_png(next(iter_samples(shard_paths(m, "lowres-test")))["png"])
    assert img.shape == (32, 32, 3)


def test_cifar10_corrupted_archive_fails_with_one_line_and_is_not_kept(tmp_path: Path, http_server) -> None:
    body = _cifar_archive()
    url = http_server.add("/cifar.tar.gz", body[:-50] + b"\0" * 50)  # same size, wrong bytes
    md5 = hashlib.md5(body).hexdigest()
    with pytest.raises(DownloadError, match="md5 mismatch") as exc:
        _run(tmp_path, "cifar10", f"download.cifar10_url={url}", f"download.cifar10_md5={md5}", "download.retries=1")
    assert "\n" not in str(exc.value)
    assert not list((tmp_path / "downloads").glob("cifar-10-python.tar.gz*"))  # nothing partial left
    assert len(http_server.routes["/cifar.tar.gz"].hits) == 2  # retried once


def test_restricted_unpickler_refuses_code_in_a_batch(tmp_path: Path) -> None:
    from tasks.download import read_cifar_batch

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "b").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        read_cifar_batch(tmp_path / "b")


# ---------------------------------------------------------------- downloads: resume, truncation, stalls
def test_truncated_transfer_resumes_with_range_and_verifies(tmp_path: Path, http_server) -> None:
    body = bytes(range(256)) * 400
    url = http_server.add("/f.bin", body, truncate_at=30_000, truncations=1)
    out = download(url, tmp_path / "f.bin", sha256=hashlib.sha256(body).hexdigest(), backoff=0, progress=False)
    assert out.read_bytes() == body
    hits = http_server.routes["/f.bin"].hits
    assert hits == ["", "bytes=30000-"]  # the second request resumed where the first broke off


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path, http_server) -> None:
    body = b"abc" * 10_000
    url = http_server.add("/g.bin", body, truncate_at=1000, truncations=1, ignore_range=True)
    out = download(url, tmp_path / "g.bin", sha256=hashlib.sha256(body).hexdigest(), backoff=0, progress=False)
    assert out.read_bytes() == body


def test_stalled_server_times_out(tmp_path: Path, http_server) -> None:
    url = http_server.add("/slow.bin", b"x" * 100, stall=3)
    with pytest.raises(DownloadError, match="after 1 tries"):
        download(url, tmp_path / "slow.bin", retries=0, timeout=0.5, progress=False)
    assert not (tmp_path / "slow.bin").exists()


def test_first_download_records_a_checksum_that_later_uses_verify(tmp_path: Path, http_server) -> None:
    url = http_server.add("/h.zip", b"payload")
    dest = download(url, tmp_path / "h.zip", progress=False)
    recorded = (tmp_path / "h.zip.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(b"payload").hexdigest()
    dest.write_bytes(b"tampered")  # a later use notices and fetches again
    assert download(url, dest, progress=False).read_bytes() == b"payload"


# ---------------------------------------------------------------- div2k and hostile archives
def _png_bytes(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_div2k_end_to_end_from_local_server(tmp_path: Path, http_server) -> None:
    train = _zip({f"DIV2K_train_HR/{i:04d}.png": _png_bytes(90, 120, i) for i in range(1, 11)})
    valid = _zip({f"DIV2K_valid_HR/{i:04d}.png": _png_bytes(90, 120, i) for i in range(801, 804)})
    t_url = http_server.add("/DIV2K_train_HR.zip", train)
    v_url = http_server.add("/DIV2K_valid_HR.zip", valid)
    res = _run(
        tmp_path,
        "div2k",
        f"download.div2k_train_url={t_url}",
        f"download.div2k_valid_url={v_url}",
        "download.limit=null",
    )
    m = res.manifest
    assert m["sets"] == {"highres": {"train": 9, "val": 1, "test": 3}}
    assert set(m["archive_sha256"]) == {"DIV2K_train_HR.zip", "DIV2K_valid_HR.zip"}
    img = decode_png(next(iter_samples(shard_paths(m, "highres-test")))["png"])
    assert img.shape == (90, 120, 3)


def test_a_high_res_only_source_skips_the_upscale_stage_in_the_flow(
    prefect_harness, tmp_path: Path, http_server
) -> None:
    """DIV2K has no low-res crops: the flow plans no upscale task and prepare takes the download alone."""
    from flows.pipeline import pipeline

    train = _zip({f"DIV2K_train_HR/{i:04d}.png": _png_bytes(90, 120, i) for i in range(1, 11)})
    valid = _zip({f"DIV2K_valid_HR/{i:04d}.png": _png_bytes(90, 120, i) for i in range(801, 804)})
    urls = [
        f"download.div2k_train_url={http_server.add('/t.zip', train)}",
        f"download.div2k_valid_url={http_server.add('/v.zip', valid)}",
    ]
    result = pipeline(dataset="div2k", preset="tiny", overrides=urls, workdir=str(tmp_path / "w"), until="prepare")
    assert [c["stage"] for c in result["calls"]] == ["download", "prepare"]
    assert set(result["stages"]) == {"download", "prepare"}
    prepared = json.loads((Path(result["stages"]["prepare"]) / "manifest.json").read_text())
    assert prepared["counts"]["train"] > 0


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_zip_with_escaping_entries_is_rejected(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip({"ok.png": b"1", name: b"2"}))
    with pytest.raises(UnsafeArchiveError):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.png").exists()


def test_tar_with_escaping_symlink_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        extract(archive, tmp_path / "out")


def test_div2k_zip_slip_fails_the_stage_and_leaves_no_dataset(tmp_path: Path, http_server) -> None:
    bad = _zip({"DIV2K_train_HR/0001.png": _png_bytes(40, 40, 1), "../../escape.png": b"x"})
    t_url = http_server.add("/DIV2K_train_HR.zip", bad)
    v_url = http_server.add("/DIV2K_valid_HR.zip", bad)
    cfg = configure_run(
        "div2k", "tiny", [f"download.div2k_train_url={t_url}", f"download.div2k_valid_url={v_url}"], None
    )
    plan = download_stage.plan(cfg.download, cfg.seed, tmp_path)
    with pytest.raises(UnsafeArchiveError):
        download_stage.run(plan)
    assert not (tmp_path / "download" / plan["key"]).exists()
    assert not list(tmp_path.rglob("escape.png"))


def test_mirror_archives_sharing_a_file_name_are_both_fetched_and_kept_apart(tmp_path: Path, http_server) -> None:
    """A mirror serving train/HR.zip and valid/HR.zip: the test split must hold the valid images."""
    train = _zip({f"train/{i:04d}.png": _png_bytes(90, 120, i) for i in range(1, 6)})
    valid = _zip({f"valid/{i:04d}.png": _png_bytes(90, 120, i) for i in range(801, 803)})
    t_url = http_server.add("/train/HR.zip", train)
    v_url = http_server.add("/valid/HR.zip", valid)
    m = _run(
        tmp_path,
        "div2k",
        f"download.div2k_train_url={t_url}",
        f"download.div2k_valid_url={v_url}",
        "download.limit=null",
    ).manifest
    assert len(http_server.routes["/train/HR.zip"].hits) == len(http_server.routes["/valid/HR.zip"].hits) == 1
    assert _sources(m, "highres", "test") == {"div2k/0801.png", "div2k/0802.png"}
    assert not _sources(m, "highres", "train") & _sources(m, "highres", "test")
    with pytest.raises(ConfigError, match="same URL"):
        _run(tmp_path, "div2k", f"download.div2k_train_url={t_url}", f"download.div2k_valid_url={t_url}")
