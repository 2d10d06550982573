"""A run's config is resolved once: the caller's config stays as it was, the data is searched once per run, and
config.yaml records what ran (amp for the device, the absolute data root) while environment.json keeps what was
asked for."""

import copy
import json

import pytest
import yaml

import norga.data
from norga.cli import main
from norga.comparison import MethodRun, run_method
from norga.config_io import load_config
from norga.data import benchmark as benchmark_module
from norga.engine import resolve as resolve_module
from norga.engine.build import build_run
from norga.engine.loop import run_experiment
from norga.engine.resolve import resolve_config
from norga.runtime.precision import native_bf16

AMP_HERE = "bf16" if native_bf16("cpu") else "none"  # what amp=auto becomes on this CPU
#: tiny_smoke's NCM (no training) on a 4-class image folder at the relative data root "data".
SETTINGS = ["method=ncm", "data.benchmark=imagefolder", "data.root=data", "data.num_tasks=2",
            "data.train_per_class=null", "data.test_per_class=null", "amp=auto", "device=cpu"]


@pytest.fixture
def calls(make, tmp_path, monkeypatch):
    """The image folder under tmp_path/data, tmp_path the working directory, and a count of the resolutions and
    of the data searches (under every name the search is reachable by)."""
    make.image_folder(tmp_path / "data", per_class=2)
    monkeypatch.chdir(tmp_path)
    counts = {"resolve": 0, "search": 0}
    resolve, search = resolve_module.resolve_config, benchmark_module.check_benchmark_data

    def counted_resolve(*args, **kwargs):
        counts["resolve"] += 1
        return resolve(*args, **kwargs)

    def counted_search(*args, **kwargs):
        counts["search"] += 1
        return search(*args, **kwargs)

    monkeypatch.setattr(resolve_module, "resolve_config", counted_resolve)
    for module in (resolve_module, benchmark_module, norga.data):
        monkeypatch.setattr(module, "check_benchmark_data", counted_search)
    return counts


def check_record(run_dir, root) -> None:
    """config.yaml holds the resolved amp and the absolute root; environment.json what was asked and decided."""
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["amp"] == AMP_HERE and stored["data"]["root"] == str(root.resolve())
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["precision"] == {"amp_requested": "auto", "native_bf16": native_bf16("cpu"), "compile": False,
                                        "amp": AMP_HERE}
    assert environment["data_root"] == str(root.resolve())


def test_norga_run_resolves_once_and_records_the_resolved_config(calls, tmp_path, capsys):
    arguments = [argument for setting in SETTINGS for argument in ("--set", setting)]
    assert main(["run", "tiny_smoke", *arguments, "--run-dir", "run", "--quiet"]) == 0, capsys.readouterr().err
    assert calls == {"resolve": 1, "search": 1}
    check_record(tmp_path / "run", tmp_path / "data")


def test_building_and_running_leave_the_callers_config_as_it_was(calls, tmp_path):
    config = load_config("tiny_smoke", SETTINGS)
    asked = copy.deepcopy(config)
    with pytest.raises(ValueError, match="resolve_config"):  # the configured data was not looked for
        build_run(resolve_module.resolve_config(config, locate_data=False))
    built = build_run(resolve_config(config))
    assert built.config.amp == AMP_HERE and built.config.data.root == str((tmp_path / "data").resolve())
    run_experiment(built, tmp_path / "run")
    assert config == asked and config.amp == "auto" and config.data.root == "data"
    check_record(tmp_path / "run", tmp_path / "data")
    assert calls["search"] == 1


def test_a_comparison_resolves_each_method_run_once_and_leaves_its_config_as_it_was(calls, tmp_path):
    run = MethodRun("ncm", load_config("tiny_smoke", SETTINGS), tmp_path / "comparison" / "ncm")
    asked = copy.deepcopy(run.config)
    assert run_method(run).status == "ran"
    assert calls == {"resolve": 1, "search": 1}
    check_record(run.run_dir, tmp_path / "data")
    assert run_method(run).status == "finished earlier"  # the resolved config is the one config.yaml recorded
    assert calls == {"resolve": 2, "search": 2}
    assert run.config == asked
