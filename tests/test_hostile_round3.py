"""Hostile testing, round 3: secrets in client options and in a mistyped setting, settings named as
typed, JSON errors that say JSON. Each test is one class of defect."""

from __future__ import annotations

import json
import subprocess
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
