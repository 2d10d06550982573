"""What `norga run` tells a user, triggered as a user would: the data checked first, messages whose suggestions
parse with the real parser, a hub that fails fast offline, the banner and log lines, a resume that needs only
the run directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import norga.engine.build
from norga.cli import build_parser, main
from norga.config import ConfigError
from norga.config_io import load_config
from norga.data.registry import DEBIAN_FASHION_MNIST
from norga.runtime.precision import native_bf16

SUGGESTED_SET = re.compile(r"--set ([\w.]+=\S+?)(?=[\s,;)]|\.(?:\s|$)|$)")
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
#: What the banner says of the default `amp: auto` on this CPU: bf16 where it is native, fp32 elsewhere.
DEFAULT_PRECISION = ("bf16 autocast (amp auto: native bf16 here)" if native_bf16("cpu")
                     else "fp32 (amp auto: no native bf16 here)")


def error_of(capsys, *argv) -> str:
    """The one-line error of `norga ARGV` (exit code 2)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"norga {argv[0]}: error: ") and "\n" not in err and "Traceback" not in err
    return err


def assert_suggestions_parse(message: str, command: str = "run") -> list[str]:
    """Every `--set KEY=VALUE` the message suggests is accepted by the parser and names a real config key."""
    settings = SUGGESTED_SET.findall(message)
    for setting in settings:
        build_parser().parse_args([command, "tiny_smoke", "--set", setting])
        try:
            load_config("tiny_smoke", [setting.replace("DIR", "/x").replace("FILE", "/x.npz")])
        except ConfigError as error:
            raise AssertionError(f"the message suggests --set {setting}: {error}") from error
    return settings


@pytest.fixture
def no_data_root(monkeypatch):
    monkeypatch.delenv("NORGA_DATA", raising=False)
    if DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian's Fashion-MNIST is installed, so the data is never missing here")


def test_the_data_is_checked_before_any_weights_are_fetched(no_data_root, monkeypatch, capsys, tmp_path):
    def fetch(*args, **kwargs):
        raise AssertionError("backbone weights fetched before the data was checked")

    monkeypatch.setattr(norga.engine.build, "create_backbone", fetch)
    message = error_of(capsys, "run", "tiny_smoke", "--set", "backbone.weights=hub", "--run-dir", str(tmp_path / "r"))
    assert "fashion-mnist not found" in message and "No data root is set" in message
    assert "NORGA_DATA=DIR" in message and "--data-root" not in message
    assert "data.root=DIR" in assert_suggestions_parse(message) and not (tmp_path / "r").exists()


def test_a_download_without_a_folder_goes_to_the_download_folder_and_offline_is_one_line(no_data_root, monkeypatch,
                                                                                      capsys, tmp_path):
    from norga.data import download

    monkeypatch.setenv("NORGA_DOWNLOADS", str(tmp_path / "downloads"))
    monkeypatch.setattr(download, "unreachable", lambda url, timeout=None: "<urlopen error [Errno -2] Name or "
                        "service not known>")  # no network, as these machines have none
    message = error_of(capsys, "run", "tiny_smoke", "--set", "data.download=true", "--run-dir", str(tmp_path / "r"))
    looked = message[message.index("looked in: "):message.index("No data root is set")]
    assert looked.index(str(DEBIAN_FASHION_MNIST)) < looked.index(str(tmp_path / "downloads" / "fashion-mnist"))
    assert "It could not be downloaded from http" in message and "no network access?" in message
    assert "data.download=true" not in assert_suggestions_parse(message)  # already set: not suggested again
    assert not (tmp_path / "downloads").exists() and not (tmp_path / "r").exists()


def test_offline_hub_names_the_file_option(make, monkeypatch, capsys, tmp_path):
    make.mnist_like("fashion-mnist")
    monkeypatch.setenv("NORGA_DATA", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    message = error_of(capsys, "run", "tiny_smoke", "--set", "backbone.weights=hub", "--run-dir", str(tmp_path / "r"))
    assert "HF_HUB_OFFLINE is set and they are not in the local hub cache" in message
    assert "backbone.weights=FILE" in assert_suggestions_parse(message)


def test_an_unreachable_hub_fails_at_once_without_retries(make, tmp_path):
    """No HF_HUB_OFFLINE, and a hub endpoint nothing listens on: one probe, then the hub cache only."""
    make.mnist_like("fashion-mnist")
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(NORGA_DATA=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "norga", "run", "tiny_smoke", "--set", "backbone.weights=hub",
                             "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert "Retrying" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "the hub http://127.0.0.1:9 is unreachable (no network?)" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "backbone.weights=FILE" in assert_suggestions_parse(result.stderr)


def test_a_run_prints_its_banner_and_plain_lines_and_resumes_from_its_directory_alone(make, monkeypatch, capsys,
                                                                                    tmp_path):
    make.mnist_like("data/fashion-mnist", train_per_class=4, test_per_class=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NORGA_DATA", "data")  # relative: recorded absolute
    assert main(["run", "tiny_smoke", "--run-dir", "run"]) == 0
    err = capsys.readouterr().err  # not a terminal: plain lines
    assert "\r" not in err
    data, run_dir = tmp_path / "data", tmp_path / "run"
    lines = err.splitlines()
    assert re.fullmatch(rf"{STAMP} norga · fashion-mnist: starting a run", lines[0])
    banner = "\n".join(lines[1:9])
    for expected in (f"run directory  {run_dir}", "method         norga",
                     f"fashion-mnist: 5 tasks × 2 classes, 40 training / 20 test images, from {data / 'fashion-mnist'}",
                     "vit_tiny_patch16_224 (timm vit_tiny_patch16_224, 32×32 input)",
                     "weights        random (backbone.weights=none)",
                     f"precision      {DEFAULT_PRECISION}, compile off",
                     f"device         cpu, {torch.get_num_threads()} thread"):
        assert expected in banner, banner
    body = [line for line in lines if not line.startswith("  ")][1:]
    assert body and all(re.match(rf"{STAMP} norga · fashion-mnist · task [1-5]/5 ", line) for line in body), body
    assert [line.split("task ")[1][:3] for line in body if " evaluated: " in line] == [f"{t}/5" for t in range(1, 6)]

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["root"] == str(data)
    assert json.loads((run_dir / "environment.json").read_text())["data_root"] == str(data)
    monkeypatch.delenv("NORGA_DATA")
    assert main(["run", "--resume", "run", "--quiet"]) == 0  # the recorded root is enough
    assert "resuming the run" in capsys.readouterr().err


def test_the_manifest_module_runs_without_a_runpy_warning():
    result = subprocess.run([sys.executable, "-m", "norga.data.manifest", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: python -m norga.data.manifest" in result.stdout
    assert "Warning" not in result.stderr, result.stderr


def test_the_ci_script_removes_its_cifar10_extraction(tmp_path):
    """.ci/run in a copy of the project whose test command just lists the extraction: the folder is gone after."""
    root, shared = tmp_path / "project", tmp_path / "shared" / "data"
    (root / ".ci").mkdir(parents=True)
    ci = Path(__file__).resolve().parents[2] / ".ci" / "run"
    (root / ".ci" / "run").write_text(ci.read_text())
    (root / "README.md").write_text('<!-- test-command -->\n```bash\necho "$NORGA_CIFAR10_JPG" > seen; '
                                    'ls "$NORGA_CIFAR10_JPG" > listing\n```\n')
    (shared / "cifar10").mkdir(parents=True)
    (tmp_path / "c10" / "cifar10-jpg").mkdir(parents=True)
    (tmp_path / "c10" / "cifar10-jpg" / "x.jpg").write_bytes(b"")
    subprocess.run(["tar", "czf", str(shared / "cifar10" / "cifar10-jpg.tar.gz"), "-C", str(tmp_path / "c10"),
                    "cifar10-jpg"], check=True)
    result = subprocess.run(["bash", str(root / ".ci" / "run")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    extracted = Path((root / "seen").read_text().strip())
    assert (root / "listing").read_text().split() == ["cifar10-jpg"]  # it was there while the tests ran
    assert not extracted.exists()  # and is gone now
