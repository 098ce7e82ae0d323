"""Hostile testing, round 3: secrets in client options and in a mistyped setting, settings named as
typed, JSON errors that say JSON, refusals when a run is configured, REST, messages, the bench scripts'
arguments. Each test is one class of defect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.config import build_config
from flows.pipeline import redact_overrides
from storage.errors import ConfigError

SECRET = "PW-s3cr3t-9431"


def _grep(folder: Path, needle: str) -> list[str]:
    """Every file under ``folder`` (databases included) that holds ``needle``."""
    out = subprocess.run(["grep", "-rl", "--binary-files=text", needle, str(folder)], capture_output=True, text=True)
    return out.stdout.split()


@pytest.mark.parametrize(
    "options",
    [
        {"auth": ["alice", SECRET]},
        {"headers": {"Cookie": f"sessionid={SECRET}"}},
        {"client_kwargs": {"headers": [["Authorization", f"Bearer {SECRET}"]]}},
        {"config_kwargs": {"extra": [["X-Api", f"Bearer {SECRET}"]]}},
        {"sse_kms_key_id": SECRET},
    ],
)
def test_credentials_in_client_options_are_refused_before_any_work_and_stored_nowhere(
    options: dict, tmp_path: Path, capsys
) -> None:
    workdir = tmp_path / "w"
    argv = ["run", "--preset", "tiny", "--until", "download", "--workdir", str(workdir)]
    assert main([*argv, "--set", f"store.options={json.dumps(options)}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must not hold credentials" in err[0] and SECRET not in err[0]
    assert not workdir.exists() or not _grep(workdir, SECRET)


def test_client_options_are_stored_as_their_names_only() -> None:
    """What Prefect stores (the flow's parameters: the config's JSON form and the overrides as typed)
    and what MLflow logs (the same JSON form) hold the options' names, never their values."""
    options = {"endpoint_url": f"http://127.0.0.1:9/{SECRET}", "client_kwargs": {"region_name": SECRET}}
    item = f"store.options={json.dumps(options)}"
    cfg = build_config("tiny", [item, "store.url=s3://b/p"])
    assert cfg.store.options == options  # the run itself uses them
    stored = json.dumps(cfg.model_dump(mode="json"))
    assert SECRET not in stored and '"endpoint_url": "***"' in stored
    assert SECRET not in " ".join(redact_overrides([item]))


def test_a_mistyped_setting_never_echoes_its_secret(capsys) -> None:
    url = f"https://alice:{SECRET}@host/c.tgz"
    for item in (f"download.cifar10_url {url}", f"download.cifar10_url={url}"):
        with pytest.raises(ConfigError) as exc:
            build_config("tiny", [item])
        assert SECRET not in str(exc.value)
    assert main(["run", "--set", f"download.cifar10_url {url}", "--workdir", "/nonexistent/w"]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "expects key=value" in err


def test_a_setting_is_named_as_typed() -> None:
    for typed in (".lr", "train..lr", "train."):
        with pytest.raises(ConfigError, match=f"--set {typed.replace('.', '[.]')}: unknown setting"):
            build_config("tiny", [f"{typed}=1"])


def test_a_value_that_is_not_valid_json_says_so_and_where() -> None:
    with pytest.raises(ConfigError, match=r"store.options: not valid JSON \(.* at character \d+\)"):
        build_config("tiny", ['store.options={"bad json'])


def test_a_download_url_of_any_length_names_a_cache_file_the_file_system_takes(tmp_path: Path, http_server) -> None:
    from tasks.download import cached_name

    long = "a" * 400 + ".tar.gz"
    name = cached_name(f"http://127.0.0.1/{long}?sig=x", "fallback")
    assert len(name.encode()) <= 100 and name.endswith(".tar.gz")
    assert cached_name(f"http://127.0.0.1/{long}", "f") != cached_name(f"http://127.0.0.1/{long}x", "f")
    url = http_server.add("/" + long, b"data")
    from storage.fetch import download

    path = download(url, tmp_path / cached_name(url, "f"), retries=0, timeout=10)
    assert path.read_bytes() == b"data"


# ---------------------------------------------------------------- refused when the run is configured
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("setting", ["train.cuda_graphs=on", "train.accelerator=cuda", "evaluate.device=cuda"])
def test_a_setting_this_machine_cannot_honour_is_refused_before_the_work_dir_is_made(
    setting: str, tmp_path: Path, capsys
) -> None:
    workdir = tmp_path / "w"
    assert main(["run", "--preset", "tiny", "--set", setting, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and setting.split("=")[0] in err[0], err
    assert not workdir.exists()


def test_a_batch_larger_than_the_split_and_a_warm_up_longer_than_the_run_are_said_with_their_numbers() -> None:
    from tasks.settings.train import Settings
    from tasks.train_schedule import plan_warnings

    assert plan_warnings(Settings(batch_size=16), n_train=100, batch=16, total=30) == []
    (note,) = plan_warnings(Settings(batch_size=64), n_train=10, batch=10, total=3)
    assert "train.batch_size=64" in note and "10 images" in note and "batches of 10" in note
    (note,) = plan_warnings(Settings(warmup_steps=50, lr=1e-3), n_train=100, batch=16, total=20)
    assert "train.warmup_steps=50" in note and "20 steps" in note and "never reaches its peak 0.001" in note


def test_a_classification_only_setting_on_a_regression_run_keeps_the_keys_and_is_said(tmp_path: Path, caplog) -> None:
    """``train.rebalance`` on the regression head changes nothing: no new train key (so no retraining,
    no new evaluation, no duplicate registered version), and a warning says it is ignored; on the
    classification head it is the key's."""
    import logging

    from tasks import train

    prepared = {"stage": "prepare", "key": "p", "content": "p", "counts": {"train": 8}}

    def keys(*sets: str) -> dict[str, str]:
        cfg = build_config("tiny", list(sets))
        return {n: p["key"] for n, p in train.plans(cfg.train, 0, {"prepare": prepared}, tmp_path).items()}

    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        assert keys("train.rebalance=0.9") == keys()
        assert keys("train.colour_weight=2") == keys()
    said = [r.getMessage() for r in caplog.records]
    assert any("train.rebalance=0.9 is ignored" in m for m in said) and any("colour_weight=2" in m for m in said)
    head = "train.head=classification"
    assert keys(head, "train.rebalance=0.9") != keys(head)
    assert keys("train.loss=mse+colourfulness", "train.colour_weight=2") != keys("train.loss=mse+colourfulness")


# ---------------------------------------------------------------- REST
def test_a_request_without_content_type_or_with_a_parameter_the_model_lacks_is_a_4xx_in_one_line() -> None:
    from flows.rest import payload_problem

    body = json.dumps({"inputs": [[[[1, 2, 3]]]]}).encode()
    status, said = payload_problem(body, "")
    assert status == 415 and "Content-Type" in said and "\n" not in said
    with_params = json.dumps({"inputs": [[[[1, 2, 3]]]], "params": {"vividness": 0.2}}).encode()
    status, said = payload_problem(with_params, "application/json", frozenset())
    assert status == 400 and "'vividness'" in said and "classification-head" in said
    assert payload_problem(with_params, "application/json", frozenset({"vividness"})) is None
    assert payload_problem(body, "application/json") is None


# ---------------------------------------------------------------- messages
def test_a_usage_error_names_the_command_once(capsys) -> None:
    for argv, where in ((["bogus"], "see colorize --help"), (["serve", "--vividness", "0.2"], "see colorize --help")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert where in err and "colorize colorize" not in err
    with pytest.raises(SystemExit):
        main(["image", "--size", "33", "x.png"])
    assert "see colorize image --help" in capsys.readouterr().err


def test_a_served_models_placement_names_the_variable_and_an_empty_one_is_unset(monkeypatch) -> None:
    from model.inference import placement_from_env

    monkeypatch.setenv("COLORIZE_DEVICE", "")
    monkeypatch.setenv("COLORIZE_PRECISION", "")
    assert placement_from_env() == ("auto", "fp32")
    monkeypatch.setenv("COLORIZE_DEVICE", "bogus")
    with pytest.raises(ValueError, match=r"^\$COLORIZE_DEVICE=bogus: choose from auto, cpu, cuda"):
        placement_from_env()
    monkeypatch.setenv("COLORIZE_DEVICE", "cpu")
    monkeypatch.setenv("COLORIZE_PRECISION", "fp16")
    with pytest.raises(ValueError, match=r"^\$COLORIZE_PRECISION=fp16: choose from fp32, bf16"):
        placement_from_env()


def test_the_vividness_is_described_as_more_colour_upwards() -> None:
    from flows.cli import build_parser

    helps = build_parser()._subparsers._group_actions[0].choices["image"].format_help()
    assert "higher = more colour" in " ".join(helps.split())
    from model.choices import vividness_problem

    assert "higher: more colour" in vividness_problem(2.0)


def test_the_engine_line_names_the_engine_the_device_and_the_vividness() -> None:
    import torch

    from model.colorizer import Colorizer, ColorizerSpec
    from model.inference import Vivid, engine_line

    torch.manual_seed(0)
    net = Colorizer(ColorizerSpec(decoder_width=8, image_size=32, head="classification", classes=261)).eval()
    assert engine_line(net) == "engine torch, device cpu, fp32, vividness 0.38"
    assert engine_line(Vivid(net, 0.2)) == "engine torch, device cpu, fp32, vividness 0.2"

    class Onnx:  # onnxruntime's engine is not a torch module
        spec = net.spec

    assert engine_line(Onnx()).startswith("engine onnx, device cpu, fp32")


# ---------------------------------------------------------------- the bench scripts' arguments
BENCH = Path(__file__).parents[1] / "bench"


def _bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "argv", "said"),
    [
        ("train", ["--batch", "1"], "--batch: must be at least 2"),
        ("train", ["--size", "33"], "--size: must be a multiple of 32"),
        ("train", ["--sweep", "--sizes", "abc"], "--sizes: expected a whole number, got 'abc'"),
        ("train", ["--device", "bogus"], "--device bogus"),
        ("bootstrap", ["--images", "0"], "--images: must be at least 1, got 0"),
        ("colorize", ["--net-sizes", "100"], "--net-sizes: must be a multiple of 32"),
        ("video", ["--frames", "0"], "--frames: must be at least 1"),
        ("video", ["--workdir", "{tmp}"], "no MLflow store"),
    ],
)
def test_a_bench_script_refuses_a_bad_argument_in_one_line_with_exit_2(
    script: str, argv: list[str], said: str, tmp_path: Path, capsys
) -> None:
    if script == "video" and "--workdir" not in argv:
        argv = [*argv, "--workdir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        _bench(script).main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_bench_device_that_is_not_there_is_one_line(capsys) -> None:
    for script in ("colorize", "train"):
        with pytest.raises(SystemExit) as exc:
            _bench(script).main(["--device", "cuda"])
        assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err
