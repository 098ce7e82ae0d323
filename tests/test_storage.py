"""Stage folders, manifests and shards: what finished is provable, what did not finish is never trusted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from storage.atomic import write_bytes
from storage.shards import ShardDataset, ShardWriter, decode_png, encode_png, iter_samples, write_shards
from storage.stage import StageError, finished, load_manifest, make_plan, run_stage, verify


def _work(n_files: int = 2, calls: list[int] | None = None):
    def work(out: Path) -> dict:
        if calls is not None:
            calls.append(1)
        for i in range(n_files):
            write_bytes(out / f"part-{i}.bin", bytes([i]) * (100 + i))
        return {"counts": {"files": n_files}}

    return work


def _plan(tmp_path: Path, **config) -> dict:
    return make_plan(tmp_path, "demo", [], {"n": 2, **config}, "code-v1")


def test_finished_stage_is_reused_and_manifest_lists_every_file(tmp_path: Path) -> None:
    calls: list[int] = []
    plan = _plan(tmp_path)
    first = run_stage(plan, _work(calls=calls))
    second = run_stage(plan, _work(calls=calls))
    assert (first.cached, second.cached, len(calls)) == (False, True, 1)
    m = first.manifest
    assert set(m["files"]) == {"part-0.bin", "part-1.bin"}
    assert m["files"]["part-1.bin"]["size"] == 101
    assert m["counts"] == {"files": 2} and m["config"] == {"n": 2}
    assert "torch" in m["versions"] and m["timings"]["seconds"] >= 0
    assert not list(tmp_path.glob("demo/*.partial"))


def test_key_changes_with_config_code_and_inputs(tmp_path: Path) -> None:
    base = _plan(tmp_path)
    other_cfg = _plan(tmp_path, lr=0.1)
    other_code = make_plan(tmp_path, "demo", [], {"n": 2}, "code-v2")
    upstream = run_stage(base, _work()).manifest
    with_input = make_plan(tmp_path, "demo", [upstream], {"n": 2}, "code-v1")
    assert len({base["key"], other_cfg["key"], other_code["key"], with_input["key"]}) == 4


def test_tampered_file_is_detected_and_stage_redone(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    folder = run_stage(plan, _work()).folder
    (folder / "part-0.bin").write_bytes(b"\x07" * 100)  # same size, different content
    manifest, problem = verify(folder)
    assert manifest is None and "sha256" in problem
    calls: list[int] = []
    again = run_stage(plan, _work(calls=calls))
    assert not again.cached and calls == [1]
    assert (folder / "part-0.bin").read_bytes() == b"\x00" * 100


def test_truncated_or_missing_file_is_detected(tmp_path: Path) -> None:
    folder = run_stage(_plan(tmp_path), _work()).folder
    with open(folder / "part-1.bin", "r+b") as fh:
        fh.truncate(10)
    assert "truncated" in verify(folder)[1]
    (folder / "part-1.bin").unlink()
    assert "missing" in verify(folder)[1]
    with pytest.raises(StageError, match="missing"):
        load_manifest(folder)


def test_edited_manifest_is_detected(tmp_path: Path) -> None:
    folder = run_stage(_plan(tmp_path), _work()).folder
    m = json.loads((folder / "manifest.json").read_text())
    m["counts"]["files"] = 99
    (folder / "manifest.json").write_text(json.dumps(m))
    assert finished(_plan(tmp_path)) is None
    assert "edited" in verify(folder)[1]


def test_failed_work_leaves_no_finished_folder(tmp_path: Path) -> None:
    plan = _plan(tmp_path)

    def boom(out: Path) -> dict:
        write_bytes(out / "half.bin", b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_stage(plan, boom)
    assert finished(plan) is None
    assert json.loads((tmp_path / "demo" / "last.json").read_text())["state"] == "failed"


def test_shards_are_bounded_by_count_and_size(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    samples = [{"__key__": f"s{i:03d}", "png": encode_png(img)} for i in range(25)]
    by_count = write_shards(tmp_path / "a", "x", samples, maxcount=10)
    assert [s["count"] for s in by_count] == [10, 10, 5]
    one = len(samples[0]["png"])
    by_size = write_shards(tmp_path / "b", "x", samples, maxsize=3 * one)
    assert all(s["count"] <= 3 for s in by_size) and sum(s["count"] for s in by_size) == 25
    back = [decode_png(s["png"]) for s in iter_samples(sorted((tmp_path / "a").glob("*.tar")))]
    assert len(back) == 25 and np.array_equal(back[0], img)


def test_killed_shard_writer_leaves_no_shard_that_reads_as_complete(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import time, numpy as np
        from storage.shards import ShardWriter, encode_png
        png = encode_png(np.zeros((8, 8, 3), np.uint8))
        w = ShardWriter({str(tmp_path)!r}, "k", maxcount=5)
        for i in range(10_000):
            w.write({{"__key__": f"s{{i:05d}}", "png": png}})
            if i == 7:
                print("ready", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finals = sorted(tmp_path.glob("k-*.tar"))
    assert [p.name for p in finals] == ["k-000000.tar"]  # the first shard closed at 5 samples
    assert len(list(iter_samples(finals))) == 5
    assert len(list(tmp_path.glob(".k-000001.tar.tmp-*"))) == 1  # the killed one only under a temp name


def test_shuffle_is_seeded_and_eval_order_is_fixed(tmp_path: Path) -> None:
    png = encode_png(np.zeros((4, 4, 3), np.uint8))
    write_shards(tmp_path, "x", [{"__key__": f"s{i:03d}", "png": png} for i in range(40)], maxcount=7)
    shards = sorted(tmp_path.glob("*.tar"))

    def keys(ds: ShardDataset) -> list[str]:
        return [k for batch in DataLoader(ds, batch_size=8) for k in batch]

    ordered = keys(ShardDataset(shards, decode=lambda s: s["__key__"]))
    assert ordered == [f"s{i:03d}" for i in range(40)]
    a = ShardDataset(shards, decode=lambda s: s["__key__"], seed=3, buffer=16)
    b = ShardDataset(shards, decode=lambda s: s["__key__"], seed=3, buffer=16)
    assert keys(a) == keys(b) != ordered
    a.set_epoch(1)
    assert keys(a) != keys(b) and sorted(keys(a)) == ordered
    a.set_epoch(1, skip=10)
    b.set_epoch(1)
    assert keys(a) == keys(b)[10:]  # resuming mid-epoch continues the same order


def test_shard_writer_abort_on_error_keeps_only_finished_shards(tmp_path: Path) -> None:
    png = encode_png(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(KeyError), ShardWriter(tmp_path, "x", maxcount=2) as w:
        for i in range(3):
            w.write({"__key__": f"s{i}", "png": png})
        raise KeyError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["x-000000.tar"]
    time.sleep(0)
