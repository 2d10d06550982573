"""`norga sweep` without Ray: spec expansion, exclusions and trial names, the sweep directory, aggregation
against hand-computed means, sds and paired intervals, `--report`, and the message when Ray is missing."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from norga.cli import main
from norga.config import ConfigError
from norga.sweep import aggregate
from norga.sweep.directory import COMPLETE, FAILED, MANIFEST, SWEEP_YAML, SweepDirectory
from norga.sweep.spec import (
    MAX_NAME,
    SweepSpec,
    Trial,
    expand,
    load_spec,
    spec_from_grid,
    trial_config,
    trial_names,
)

# t quantile 0.975 with 2 degrees of freedom, from a printed table of Student's t (4.3027)
T_975_DF2 = 4.302652729911275


def spec(**axes) -> SweepSpec:
    return SweepSpec.from_dict({"base": "tiny_smoke", "axes": axes})


def test_the_grid_expands_first_axis_slowest_and_exclusions_drop_exactly_the_matching_trials():
    sweep = SweepSpec.from_dict({"base": "tiny_smoke", "axes": {"method": ["norga", "hide"], "seed": [0, 1, 2]},
                                 "exclude": [{"method": "hide", "seed": 2}, {"seed": 0}]})
    trials = expand(sweep)
    assert [t.assignment for t in trials] == [{"method": "norga", "seed": 1}, {"method": "norga", "seed": 2},
                                              {"method": "hide", "seed": 1}]
    assert [t.id for t in trials] == ["method=norga__seed=1", "method=norga__seed=2", "method=hide__seed=1"]
    assert expand(sweep) == trials  # stable: the same request names its trials the same way
    with pytest.raises(ConfigError, match="leave no trial"):
        expand(SweepSpec.from_dict({"base": "tiny_smoke", "axes": {"seed": [0]}, "exclude": [{"seed": 0}]}))


def test_trial_names_are_unique_file_names_even_when_values_look_alike():
    names = trial_names([{"preset": "a/x.yaml"}, {"preset": "b/x.yaml"}, {"tag": "A"}, {"tag": "a"},
                         {"prompt.layers": [0, 1]}, {"data.root": "/some where/"}])
    assert len(set(name.lower() for name in names)) == len(names)
    assert names[0].startswith("preset=x-") and names[1].startswith("preset=x-")  # same stem: told apart by a hash
    assert names[4] == "prompt.layers=0_1" and names[5] == "data.root=some_where"
    assert all("/" not in name and " " not in name for name in names)
    long = trial_names([{"key": "v" * 300}])[0]
    assert len(long) <= MAX_NAME and long != trial_names([{"key": "v" * 301}])[0]


def test_axis_values_and_shared_overrides_reach_each_trial_config():
    axes = {"method": ["norga", "hide"], "seed": [3], "prompt.length": [4]}
    sweep = SweepSpec.from_dict({"base": "tiny_smoke", "axes": axes, "set": {"data.test_per_class": 7}})
    norga, hide = (trial_config(sweep, trial) for trial in expand(sweep))
    assert (norga.method, norga.seed, norga.settings.prompt.length, norga.data.test_per_class) == ("norga", 3, 4, 7)
    assert hide.settings.prompt.length == 4  # a key of no section is each trial's method's own
    assert norga.settings.gate == "sigmoid" and hide.method == "hide" and not hasattr(hide.settings, "gate")
    assert Trial("x", {"method": "hide", "seed": 3, "prompt.length": 4}).setting == "prompt.length=4"
    presets = SweepSpec.from_dict({"axes": {"preset": ["tiny_smoke", "quickstart"]}})
    configs = [trial_config(presets, trial) for trial in expand(presets)]
    assert [c.backbone.name for c in configs] == ["vit_tiny_patch16_224", "norga-vit-tiny-c10"]
    assert all(c.method == "norga" for c in configs)  # no method axis: the preset's own method


def test_a_spec_file_and_the_grid_options_give_the_same_request(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: tiny_smoke\naxes:\n  method: [norga, hide]\n  seed: [0, 1]\nset: [wtp.train.epochs=2]\n")
    from_file = load_spec(path, ["eval.batch_size=8"])
    from_grid = spec_from_grid("tiny_smoke", ["method=norga,hide", "seed=0,1"],
                               ["wtp.train.epochs=2", "eval.batch_size=8"])
    assert from_file == from_grid and from_grid.axes["seed"] == [0, 1]  # values parsed as YAML: integers


@pytest.mark.parametrize(("data", "message"), [
    ({"base": "tiny_smoke", "axes": {"seed": [0]}, "exclude": [{"method": "hide"}]}, "'method', which is not an axis"),
    ({"base": "tiny_smoke", "axes": {"seed": [0, 1]}, "exclude": [{"seed": 5}]}, "5 is not a value of axis seed"),
    ({"base": "tiny_smoke", "axes": {"preset": ["quickstart"]}}, "not both"),
    ({"axes": {"seed": [0]}}, "not neither"),
    ({"base": "tiny_smoke", "axes": {"seed": [0]}, "set": ["method=hide"]}, "make it an axis"),
    ({"base": "tiny_smoke", "axes": {"seed": [0]}, "set": {"seed": 1}}, "both an axis and in `set`"),
    ({"base": "tiny_smoke", "axes": {"seed": [0, 0]}}, "lists a value twice"),
    ({"base": "tiny_smoke", "axes": {}}, "`axes` must map"),
    ({"base": "tiny_smoke", "axes": {"seed": 0}}, "non-empty list"),
    ({"base": "tiny_smoke", "axes": {"seed": [0]}, "grid": 1}, "unknown key 'grid'"),
])
def test_bad_specs_are_refused_with_the_reason(data, message):
    with pytest.raises(ConfigError, match=message):
        SweepSpec.from_dict(data)


@pytest.mark.parametrize(("arguments", "message"), [
    (["tiny_smoke", "--grid", "method=norga,hid"], "did you mean 'hide'"),
    (["tiny_smoke", "--grid", "prompt.lenght=2,3"], "unknown config key 'norga.prompt.lenght' (did you mean 'length'?)"),
    (["tiny_smoke", "--grid", "seed"], "must look like KEY=V1,V2"),
    (["tiny_smoke", "--grid", "seed=0", "--grid", "seed=1"], "given twice"),
    (["tiny_smoke"], "give a sweep spec"),
    (["tiny_smoke", "--grid", "seed=0", "--cpus-per-trial", "999"], "exceeds this machine's"),
    (["tiny_smoke", "--grid", "seed=0", "--gpus-per-trial", "2"], "not supported yet"),
    (["--resume", "x", "--grid", "seed=0"], "drop --grid"),
])
def test_bad_requests_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, arguments, message):
    assert main(["sweep", *arguments, *([] if "--resume" in arguments else ["--dir", str(tmp_path / "s")])]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "s").exists()


def test_without_ray_the_sweep_says_how_to_install_it_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["sweep", "tiny_smoke", "--grid", "seed=0,1", "--dir", str(tmp_path / "s")]) == 2
    error = capsys.readouterr().err
    assert "pip install 'norga[sweep]'" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def made_up_sweep(tmp_path, results: dict[str, dict | None], axes: dict | None = None, overrides=(),
                  name: str = "sweep") -> SweepDirectory:
    """A sweep directory whose trials' results.json hold the given made-up metrics (None: the run never finished)."""
    sweep = SweepSpec.from_dict({"base": "tiny_smoke", "axes": axes or {"method": ["norga", "hide"], "seed": [0, 1, 2]},
                                 "set": list(overrides)})
    trials = expand(sweep)
    directory = SweepDirectory.create(tmp_path / name, sweep, trials, [t.assignment["method"] for t in trials],
                                      [t.assignment["seed"] for t in trials])
    for trial in trials:
        metrics = results[trial.id]
        run_dir = directory.path / trial.id
        run_dir.mkdir()
        record = {"complete": metrics is not None, "metrics": {}, "task_identity_accuracy": None}
        if metrics is not None:
            record["task_identity_accuracy"] = metrics.pop("tii")
            record["metrics"] = metrics
        (run_dir / "results.json").write_text(json.dumps(record))
        directory.update(trial.id, status=COMPLETE if metrics is not None else FAILED)
    return directory


def metrics(fa, ca, ffm, tii, til=None):
    values = {"final_average_accuracy": fa, "cumulative_average_accuracy": ca, "forgetting": ffm, "tii": tii}
    return values if til is None else {**values, "task_incremental_accuracy": til}


def test_summary_and_paired_differences_match_hand_computed_values(tmp_path):
    directory = made_up_sweep(tmp_path, {
        "method=norga__seed=0": metrics(60, 70, 10, 50), "method=norga__seed=1": metrics(62, 70, 12, 50),
        "method=norga__seed=2": metrics(67, 70, 14, 50),
        "method=hide__seed=0": metrics(58, 71, 9, 50, til=90), "method=hide__seed=1": metrics(61, 71, 9, 50, til=94),
        "method=hide__seed=2": None,  # did not finish: counts nowhere
    })
    rows = aggregate.trial_rows(directory)
    assert [r["status"] for r in rows] == ["complete"] * 5 + ["failed"]
    assert rows[5]["final_average_accuracy"] is None
    norga, hide = aggregate.summarize(rows)
    # norga FA 60, 62, 67: mean 63, squared deviations 9 + 1 + 16 = 26 over n - 1 = 2
    assert (norga["method"], norga["n"], norga["seeds"]) == ("norga", 3, [0, 1, 2])
    assert norga["final_average_accuracy"]["mean"] == pytest.approx(63)
    assert norga["final_average_accuracy"]["sd"] == pytest.approx(math.sqrt(13))
    assert norga["cumulative_average_accuracy"] == {"n": 3, "mean": pytest.approx(70), "sd": pytest.approx(0)}
    assert norga["task_incremental_accuracy"] == {"n": 0, "mean": None, "sd": None}  # not recorded: "—"
    # hide FA 58, 61: mean 59.5, sd sqrt(4.5); task-IL 90, 94: mean 92, sd sqrt(8)
    assert hide["n"] == 2 and hide["final_average_accuracy"]["mean"] == pytest.approx(59.5)
    assert hide["final_average_accuracy"]["sd"] == pytest.approx(math.sqrt(4.5))
    assert hide["task_incremental_accuracy"]["mean"] == pytest.approx(92)
    assert hide["task_incremental_accuracy"]["sd"] == pytest.approx(math.sqrt(8))

    pairs = {p["metric"]: p for p in aggregate.paired_differences(rows)}
    assert set(pairs) == {"final_average_accuracy", "cumulative_average_accuracy", "forgetting",
                          "task_identity_accuracy"}  # task-IL: no seed where both recorded it
    fa = pairs["final_average_accuracy"]
    # shared seeds 0, 1: differences 60 - 58 = 2 and 62 - 61 = 1: mean 1.5, sd sqrt(0.5), t(0.975, 1) = 12.7062
    assert (fa["method_a"], fa["method_b"], fa["n"], fa["seeds"]) == ("norga", "hide", 2, [0, 1])
    assert fa["setting_a"] == fa["setting_b"] == ""
    assert fa["mean_difference"] == pytest.approx(1.5) and fa["sd"] == pytest.approx(math.sqrt(0.5))
    half = 12.706204736174707 * math.sqrt(0.5) / math.sqrt(2)
    assert (fa["ci_low"], fa["ci_high"]) == (pytest.approx(1.5 - half), pytest.approx(1.5 + half))
    assert pairs["forgetting"]["mean_difference"] == pytest.approx(2)  # (10 - 9 + 12 - 9) / 2


def test_paired_interval_over_three_seeds(tmp_path):
    directory = made_up_sweep(tmp_path, {
        "method=norga__seed=0": metrics(60, 70, 10, 50), "method=norga__seed=1": metrics(62, 70, 12, 50),
        "method=norga__seed=2": metrics(67, 70, 14, 50), "method=hide__seed=0": metrics(58, 70, 10, 50),
        "method=hide__seed=1": metrics(61, 70, 12, 50), "method=hide__seed=2": metrics(63, 70, 14, 50)})
    fa = next(p for p in aggregate.paired_differences(aggregate.trial_rows(directory))
              if p["metric"] == "final_average_accuracy")
    # differences 2, 1, 4: mean 7/3, squared deviations (1 + 16 + 25) / 9 = 14/3 over 2: variance 7/3
    assert fa["n"] == 3 and fa["mean_difference"] == pytest.approx(7 / 3)
    assert fa["sd"] == pytest.approx(math.sqrt(7 / 3))
    half = T_975_DF2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert fa["ci_low"] == pytest.approx(7 / 3 - half) and fa["ci_high"] == pytest.approx(7 / 3 + half)


def test_report_rewrites_tables_and_plot_without_ray_and_shows_a_dash_for_unrecorded_metrics(tmp_path, capsys,
                                                                                              monkeypatch):
    directory = made_up_sweep(tmp_path, {
        "method=norga__seed=0": metrics(60, 70, 10, 50), "method=norga__seed=1": metrics(62, 70, 12, 50),
        "method=norga__seed=2": None, "method=hide__seed=0": metrics(58, 71, 9, 50),
        "method=hide__seed=1": metrics(61, 71, 9, 50), "method=hide__seed=2": None})
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["sweep", "--report", str(directory.path)]) == 0
    out = capsys.readouterr().out
    assert "4 of 6 trials complete" in out
    norga_line = next(line for line in out.splitlines() if line.startswith("norga "))
    assert norga_line.split()[3:6] == ["2", "61.00", "±"] and norga_line.split()[-1] == "—"
    assert "norga − hide" in out and "+1.50" in out
    with open(directory.path / "sweep.csv") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["complete", "complete", "failed"] * 2
    with open(directory.path / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert [r["method"] for r in summary] == ["norga", "hide"]
    assert float(summary[1]["final_average_accuracy_mean"]) == 59.5
    assert summary[0]["task_incremental_accuracy_mean"] == ""
    assert json.loads((directory.path / "paired.json").read_text())["pairs"][0]["n"] == 2
    assert (directory.path / "sweep.png").stat().st_size > 10_000


def test_several_sweeps_report_as_one_table_with_pairs_across_them_and_across_settings(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    first = made_up_sweep(tmp_path, {"method=norga__seed=0": metrics(60, 70, 10, 50),
                                     "method=norga__seed=1": metrics(62, 70, 12, 50)},
                          axes={"method": ["norga"], "seed": [0, 1]}, name="a")
    second = made_up_sweep(tmp_path, {"method=hide__prompt.length=3__seed=0": metrics(57, 70, 10, 50),
                                      "method=hide__prompt.length=3__seed=1": metrics(58, 70, 12, 50),
                                      "method=hide__prompt.length=4__seed=0": metrics(59, 70, 10, 50),
                                      "method=hide__prompt.length=4__seed=1": metrics(61, 70, 12, 50)},
                           axes={"method": ["hide"], "prompt.length": [3, 4], "seed": [0, 1]}, name="b")
    assert main(["sweep", "--report", str(first.path), str(second.path), "--into", str(tmp_path / "ab"),
                 "--pairs-with", "norga"]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 trials complete" in out
    pairs = json.loads((tmp_path / "ab" / "paired.json").read_text())["pairs"]
    fa = {(p["method_a"], p["setting_a"], p["method_b"], p["setting_b"]): p for p in pairs
          if p["metric"] == "final_average_accuracy"}
    # three arms, three pairs: norga − hide(3): 3, 4 -> 3.5; norga − hide(4): 1, 1 -> 1; hide(3) − hide(4): -2, -3
    assert fa[("norga", "", "hide", "prompt.length=3")]["mean_difference"] == pytest.approx(3.5)
    assert fa[("norga", "", "hide", "prompt.length=4")]["mean_difference"] == pytest.approx(1.0)
    assert fa[("hide", "prompt.length=3", "hide", "prompt.length=4")]["mean_difference"] == pytest.approx(-2.5)
    assert "norga (base) − hide (prompt.length=3)" in out
    assert "hide (prompt.length=3) − hide (prompt.length=4)" not in out  # --pairs-with norga: printed pairs only
    sources = json.loads((tmp_path / "ab" / "sources.json").read_text())["sweeps"]
    assert sources == [str(first.path), str(second.path)]
    rows = json.loads((tmp_path / "ab" / "sweep.json").read_text())["trials"]
    assert {Path(r["run_dir"]).parent for r in rows} == {first.path, second.path}
    assert not (first.path / "paired.json").exists()  # the sources are left as they were


def test_an_override_of_one_methods_section_makes_an_arm_of_its_own_when_sweeps_combine(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    axes = {"method": ["norga"], "seed": [0, 1]}
    plain = made_up_sweep(tmp_path, {"method=norga__seed=0": metrics(60, 70, 10, 50),
                                     "method=norga__seed=1": metrics(62, 70, 12, 50)}, axes=axes, name="a")
    longer = made_up_sweep(tmp_path, {"method=norga__seed=0": metrics(61, 70, 10, 50),
                                      "method=norga__seed=1": metrics(65, 70, 12, 50)}, axes=axes, name="b",
                           overrides=["norga.prompt.length=3"])
    assert main(["sweep", "--report", str(plain.path), str(longer.path), "--into", str(tmp_path / "ab")]) == 0
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())["groups"]
    assert [(g["method"], g["setting"]) for g in summary] == [("norga", ""), ("norga", "norga.prompt.length=3")]
    fa = next(p for p in json.loads((tmp_path / "ab" / "paired.json").read_text())["pairs"]
              if p["metric"] == "final_average_accuracy")
    assert (fa["setting_b"], fa["mean_difference"]) == ("norga.prompt.length=3", pytest.approx(-2.0))  # -1, -3
    assert "norga (base) − norga (norga.prompt.length=3)" in capsys.readouterr().out


def test_combining_sweeps_refuses_overlaps_other_overrides_and_a_missing_into(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    one_seed = {"method": ["norga"], "seed": [0]}
    first = made_up_sweep(tmp_path, {"method=norga__seed=0": metrics(60, 70, 10, 50)}, axes=one_seed, name="a")
    again = made_up_sweep(tmp_path, {"method=norga__seed=0": metrics(61, 70, 10, 50)}, axes=one_seed, name="b")
    other = made_up_sweep(tmp_path, {"method=norga__seed=0": metrics(61, 70, 10, 50)}, axes=one_seed, name="c",
                          overrides=["data.test_per_class=7"])
    for dirs, into, message in [((first, again), "x", "both hold norga (base, tiny_smoke, seed 0)"),
                                ((first, other), "y", "pairs across them would compare different experiments"),
                                ((first, again), None, "add --into OUT")]:
        argv = ["sweep", "--report", *(str(d.path) for d in dirs)] + (["--into", str(tmp_path / into)] if into else [])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        if into:
            assert not (tmp_path / into).exists()  # nothing written
    assert main(["sweep", "quickstart", "--grid", "seed=0", "--into", str(tmp_path / "z")]) == 2
    assert "--into goes with --report" in capsys.readouterr().err


def test_sweep_directories_are_exclusive_and_locked_while_they_run(tmp_path):
    sweep = spec(seed=[0])
    trials = expand(sweep)
    first = SweepDirectory.create(tmp_path / "s", sweep, trials, ["norga"], [0])
    assert (first.path / SWEEP_YAML).is_file()
    assert json.loads((first.path / MANIFEST).read_text())["trials"][0]["status"] == "pending"
    with pytest.raises(FileExistsError, match="--resume"):
        SweepDirectory.create(tmp_path / "s", sweep, trials, ["norga"], [0])
    assert SweepDirectory.free_name(tmp_path, "s") == tmp_path / "s-2"
    reopened = SweepDirectory.open(first.path)
    assert reopened.spec == sweep and reopened.trials == first.trials
    with first.lock():
        with pytest.raises(ConfigError, match=r"another sweep \(norga\) is running"):
            with reopened.lock():
                pass
    with reopened.lock():  # released
        pass
    with pytest.raises(FileNotFoundError, match="not a sweep directory"):
        SweepDirectory.open(tmp_path)


def test_a_worker_attempt_counts_once_its_file_is_in_place_not_while_it_is_being_written(tmp_path, capsys):
    from norga.sweep.executor import ATTEMPTS, _record_starts

    sweep = spec(seed=[0])
    trials = expand(sweep)
    directory = SweepDirectory.create(tmp_path / "s", sweep, trials, ["norga"], [0])
    folder = directory.path / ATTEMPTS / trials[0].id
    folder.mkdir(parents=True)
    (folder / f".{1:020d}-4242.0123456789abcdef.tmp").write_text("")  # a worker's atomic write, mid-way
    _record_starts(directory, [trials[0].id])
    assert directory.trial(trials[0].id)["attempts"] == 0 and directory.trial(trials[0].id)["status"] == "pending"
    (folder / f"{2:020d}-4343").write_text("10.0.0.7")
    _record_starts(directory, [trials[0].id])
    entry = directory.trial(trials[0].id)
    assert entry["attempts"] == 1 and entry["status"] == "running"
    assert entry["worker"] == {"pid": 4343, "node": "10.0.0.7"}
    assert "attempt 1, pid 4343 on 10.0.0.7" in capsys.readouterr().err


def test_the_documented_specs_expand_as_they_say(tmp_path):
    from textwrap import dedent

    from norga.commands.sweep import EPILOG

    example = Path(__file__).resolve().parents[1] / "examples" / "sweep_quickstart.yaml"
    assert [t.id for t in expand(load_spec(example))] == [f"method={m}__seed={s}" for m in ("norga", "hide")
                                                          for s in (0, 1, 2)]
    text = EPILOG.split("A spec file (YAML):\n")[1].split("\n\n")[0]
    (tmp_path / "spec.yaml").write_text(dedent(text))
    trials = expand(load_spec(tmp_path / "spec.yaml"))
    assert len(trials) == 2 * 3 * 2 - 3  # hide with 5 epochs excluded for each seed
    config = trial_config(load_spec(tmp_path / "spec.yaml"), trials[-1])
    assert (config.method, config.seed, config.data.train_per_class) == ("hide", 2, 100)


def test_the_demo_spec_runs_five_rows_on_three_seeds_and_only_hide_goes_without_prompts():

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "sweep_demo.yaml")
    configs = [trial_config(spec, trial) for trial in expand(spec)]
    rows = {(c.method, c.settings.prompt.length if c.method == "hide" else None) for c in configs}
    assert rows == {("norga", None), ("hide", 5), ("hide", 0), ("dualprompt", None), ("ncm", None)}
    assert len(configs) == 15 and {c.seed for c in configs} == {42, 0, 1}
    assert all(c.data.test_per_class == 300 and c.data.benchmark == "fashion-mnist" for c in configs)
    norga = next(c for c in configs if c.method == "norga")
    assert norga.settings.prompt.length == 5 and norga.settings.gate == "sigmoid"


def test_the_plot_labels_of_long_settings_do_not_run_into_each_other():
    from norga.sweep.plot import sweep_figure

    rows = [{"method": method, "setting": setting, "benchmark": "fashion-mnist", "seed": seed, "status": "complete",
             **dict.fromkeys(aggregate.METRICS, 50.0 + seed)}
            for method, setting in [("norga", "hide.prompt.length=5"), ("hide", "hide.prompt.length=5"),
                                    ("hide", "hide.prompt.length=0"), ("dualprompt", "hide.prompt.length=5"),
                                    ("ncm", "hide.prompt.length=5")] for seed in (0, 1)]
    figure = sweep_figure(aggregate.summarize(rows), rows)
    renderer = figure.canvas.get_renderer()
    panels = [axis for axis in figure.axes if axis.axison]
    assert [axis.get_title() for axis in panels] == [f"{label} (%)" for label in aggregate.METRICS.values()]
    for axis in panels:
        boxes = [label.get_window_extent(renderer) for label in axis.get_xticklabels()]
        assert len(boxes) == 5
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    import matplotlib.pyplot as plt
    plt.close(figure)
