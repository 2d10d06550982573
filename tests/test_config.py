"""Config loading: presets, YAML, typed overrides, helpful errors, round trip, preset generation."""

import importlib.util
from pathlib import Path

import pytest

from norga.config import ConfigError, RunConfig
from norga.config_io import (
    default_config,
    dump_config,
    load_config,
    preset_names,
    preset_text,
)

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_ARGS = ROOT.parent / "shared" / "reference" / "official_scripts_effective_args.json"


def test_overrides_of_each_type():
    config = load_config(None, ["norga.wtp.train.epochs=3", "norga.wtp.train.lr=1", "norga.gate=gelu",
                                "norga.prompt.layers=[0, 2]", "norga.batchwise_prompt=true",
                                "backbone.timm_kwargs={img_size: 32}", "data.root=/d", "norga.tii.train.lr=1e-3"])
    s = config.settings
    assert s.wtp.train.epochs == 3 and s.wtp.train.lr == 1.0 and isinstance(s.wtp.train.lr, float)
    assert s.gate == "gelu" and s.prompt.layers == [0, 2] and s.batchwise_prompt is True
    assert s.tii.train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; a number field takes it as a number
    assert config.backbone.timm_kwargs == {"img_size": 32} and config.data.root == "/d"


@pytest.mark.parametrize(("override", "message"), [
    ("norga.wtp.train.epoch=3", "unknown config key 'norga.wtp.train.epoch' \\(did you mean 'epochs'\\?\\)"),
    ("norga.wtp.trian.epochs=3", "unknown config key 'norga.wtp.trian' \\(did you mean 'train'\\?\\)"),
    ("norga.batchwise_prompt=yes please", "norga.batchwise_prompt must be true or false"),
    ("norga.wtp.train.epochs=2.5", "norga.wtp.train.epochs must be an integer >= 0"),
    ("norga.gate=tahn", "did you mean 'tanh'"),
    ("norga.gate=none", "norga.gate must be one of \\['tanh'"),  # an ungated NoRGa is HiDe-Prompt: method=hide
    ("norga.prefix_layout=mixed", "must be one of \\['correct', 'official'\\]"),
    ("norga.tii.train.schedule=linear", "must be one of \\['constant', 'step', 'cosine', 'coda_cosine'\\]"),
    ("noequals", "must look like section.key=value"),
    ("method=dualpromt", "did you mean 'dualprompt'"),
    ("prompt.gate=tanh", "unknown config key 'prompt': moved to norga.prompt / norga.gate"),
    ("eval.batchwise_prompt=true", "unknown config key 'eval.batchwise_prompt'"),
    ("hide.gate=tanh", "unknown config key 'hide.gate'"),  # HiDe-Prompt has no gate to set
    ("seed.x=1", "seed must be an integer >= 0, got {.x.: 1}"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(("override", "message"), [
    ("norga.wtp.train.epochs=-1", "norga.wtp.train.epochs must be an integer >= 0, got -1"),
    ("norga.wtp.train.lr=-0.1", "norga.wtp.train.lr must be a finite number > 0, got -0.1"),
    ("norga.wtp.train.lr=0", "must be a finite number > 0"),
    ("norga.wtp.train.lr=.nan", "norga.wtp.train.lr must be a finite number > 0, got nan"),
    ("norga.tii.train.batch_size=0", "norga.tii.train.batch_size must be an integer >= 1, got 0"),
    ("norga.prompt.momentum=1.5", "norga.prompt.momentum must be a finite number >= 0 and <= 1"),
    ("norga.prompt.layers=[-1]", "norga.prompt.layers must be a list, each an integer >= 0"),
    ("eval.batch_size=0", "eval.batch_size must be an integer >= 1"),
    ("data.workers=-2", "data.workers must be an integer >= 0"),
    ("seed=-1", "seed must be an integer >= 0"),
    ("l2p.top_k=0", "l2p.top_k must be an integer >= 1"),
    ("coda.train.clip_grad=-1", "coda.train.clip_grad must be a finite number > 0 or null"),
])
def test_values_out_of_range_are_refused_before_anything_runs(override, message):
    method = override.split(".")[0] if override.split(".")[0] in ("l2p", "coda") else "norga"
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"method={method}", override])


def test_an_override_into_another_methods_section_is_refused_for_a_run():
    with pytest.raises(ConfigError, match="--set l2p.top_k=3 does not apply: this run's method is 'norga'"):
        load_config("tiny_smoke", ["l2p.top_k=3"])
    assert load_config("tiny_smoke", ["method=l2p", "l2p.top_k=3"]).settings.top_k == 3


def test_hide_is_hide_prompt_whatever_the_preset():
    """--set method=hide on a NoRGa preset runs and records HiDe-Prompt: no gate anywhere in its config."""
    from norga.config_io import config_yaml

    hide = load_config("cifar100_sup21k_norga", ["method=hide"])
    assert hide.method == "hide" and not hasattr(hide.settings, "gate")
    assert "gate" not in config_yaml(hide)
    norga = load_config("quickstart")
    quick_hide = load_config("quickstart", ["method=hide"])
    assert norga.settings.gate == "sigmoid"
    # the quickstart's two sections are the same pipeline but for the gate
    assert {k: v for k, v in vars(norga.settings).items() if not k.startswith("gate")} == vars(quick_hide.settings)


def test_a_config_records_only_its_own_methods_settings():
    from norga.config_io import config_yaml

    for method in ("l2p", "dualprompt", "sprompt", "coda", "linear_probe", "ncm", "hide"):
        text = config_yaml(load_config("tiny_smoke", [f"method={method}"]))
        others = {"norga", "hide", "l2p", "dualprompt", "sprompt", "coda", "linear_probe", "ncm"} - {method}
        top_level = {line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")}
        assert method in top_level and not (others & top_level), (method, top_level)


def test_unknown_preset_and_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'cifar100_sup21k_norg' \\(did you mean 'cifar100_sup21k_norga'\\?\\)"):
        load_config("cifar100_sup21k_norg")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("norga:\n  wtp:\n    train:\n      epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'norga.wtp.train.epochz'"):
        load_config(bad)


def test_partial_yaml_keeps_defaults_and_round_trips(tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("norga:\n  prompt:\n    length: 9\n")
    config = load_config(partial, ["seed=3"])
    assert config.settings.prompt.length == 9 and config.seed == 3 and config.settings.wtp == default_config().settings.wtp
    dump_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_every_preset_loads():
    names = preset_names()
    assert len(names) >= 29 and "tiny_smoke" in names
    for name in names:
        assert isinstance(load_config(name), RunConfig)


def test_presets_match_the_spec_table():
    """Rows of NORGA_SPEC §3.2 (effective learning rates)."""
    c = load_config("cifar100_sup21k_norga")
    n = c.settings
    assert (c.method, n.gate, n.prompt.length, n.prompt.momentum) == ("norga", "sigmoid", 5, 0.01)
    assert (n.tii.train.lr, n.tii.train.schedule, n.tii.tap.lr, n.tii.tap.epochs) == (0.00025, "constant", 0.0025, 30)
    assert (n.wtp.train.epochs, n.wtp.train.lr, n.wtp.train.schedule, n.wtp.head_lr_scale) == (50, 0.015, "step", 0.1)
    assert (n.wtp.contrastive_weight, n.wtp.tap.lr, n.wtp.tap.epochs, n.wtp.tap.samples_per_class) == (0.1, 0.05, 80, 640)
    h = load_config("cifar100_sup21k_hide")
    assert h.method == "hide" and (h.settings.wtp.tap.lr, h.settings.wtp.tap.epochs) == (0.005, 30)
    i = load_config("imr_sup21k_norga").settings
    assert (i.wtp.train.epochs, i.wtp.train.schedule, i.prompt.length, i.wtp.contrastive_weight) == (150, "cosine", 20, 0.5)
    cub = load_config("cub_sup21k_norga").settings
    assert (cub.tii.train.lr, cub.wtp.head_lr_scale, cub.wtp.contrastive_weight, cub.tii.tap.lr) == (0.005, 1.0, 0.01, 0.025)
    five = load_config("5datasets_sup21k_norga")
    f = five.settings
    assert (f.tii.mlp_hidden, f.prompt.length, f.wtp.train.clip_grad, five.data.num_tasks) == ([4, 4], 40, 2.0, 5)
    assert f.batchwise_prompt is False  # the official True stays a compat switch
    assert "batchwise_prompt true" in preset_text("5datasets_sup21k_norga")
    assert load_config("cifar100_mocov3_norga").settings.gate == "gelu"


@pytest.mark.skipif(not OFFICIAL_ARGS.is_file(), reason=f"{OFFICIAL_ARGS} not present (it lives in ../shared)")
def test_generator_reproduces_the_committed_presets():
    spec = importlib.util.spec_from_file_location("make_presets", ROOT / "tools" / "make_presets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generated = module.generate(OFFICIAL_ARGS)
    assert len(generated) == 75  # 28 NoRGa / HiDe, 43 L2P / DualPrompt / S-Prompt++ scripts, 4 CODA-Prompt
    for file_name, text in generated.items():
        assert (ROOT / "src" / "norga" / "presets" / file_name).read_text() == text, file_name


def test_method_sections_keep_their_own_defaults_when_partly_given(tmp_path):
    partial = tmp_path / "l2p.yaml"
    partial.write_text("method: l2p\nl2p:\n  top_k: 3\n  train: {epochs: 2}\n")
    l2p = load_config(partial).settings
    assert (l2p.top_k, l2p.pool_size, l2p.prompt_type, l2p.layers) == (3, 30, "tokens", [0])
    assert (l2p.train.epochs, l2p.train.lr) == (2, 0.0025)  # the section's lr, not OptimConfig's
    dual = load_config(partial, ["method=dualprompt", "dualprompt.gate=sigmoid"]).settings
    assert dual.gate == "sigmoid" and dual.g_layers == [0, 1]
    coda = load_config(partial, ["method=coda", "coda.train.lr=0.002"]).settings
    assert (coda.train.lr, coda.train.schedule, coda.train.clip_grad) == (0.002, "coda_cosine", None)
    sprompt = load_config(partial, ["method=sprompt"]).settings
    assert sprompt.layers == [0, 1, 2, 3, 4] and sprompt.g_length == 0


def test_sections_of_other_methods_in_a_file_are_validated_too(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("method: norga\nl2p:\n  top_kk: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'l2p.top_kk' \\(did you mean 'top_k'\\?\\)"):
        load_config(both)


def test_registering_a_method_name_twice_is_an_error():
    from norga.methods import METHODS, register_method

    with pytest.raises(ValueError, match="method 'norga' is already registered"):
        register_method(type("Again", (METHODS["norga"],), {}))
    with pytest.raises(TypeError, match="Settings must be a dataclass"):
        register_method(type("NoSettings", (METHODS["ncm"],), {"name": "no_settings", "Settings": dict}))
    assert "no_settings" not in METHODS


def test_baseline_presets_match_the_official_scripts():
    """NORGA_SPEC §1.8 rows."""
    c = load_config("cifar100_sup21k_l2p")
    l2p = c.settings
    assert (c.method, l2p.pool_size, l2p.top_k, l2p.length, l2p.layers) == ("l2p", 30, 5, 5, [0])
    assert (l2p.prompt_type, l2p.train_selection, l2p.pull_weight, l2p.train.epochs) == ("tokens", "similarity", 0.1, 10)
    dual = load_config("imr_sup21k_dualprompt").settings
    assert (dual.g_layers, dual.g_length, dual.layers, dual.length) == ([0, 1], 5, [2, 3, 4], 20)
    assert (dual.train.lr, dual.train.epochs, dual.train_selection) == (0.0025, 50, "task")
    five = load_config("5datasets_sup21k_dualprompt").settings
    assert (five.pool_size, five.length, five.g_length, five.pull_weight, five.train.epochs) == (5, 40, 10, 0.5, 40)
    assert five.batchwise_prompt is False and "batchwise_prompt true" in preset_text("5datasets_sup21k_dualprompt")
    assert load_config("cifar100_sprompt").settings.train.epochs == 40  # the script without a backbone tag
    assert load_config("imr_sup21k_sprompt").settings.layers == [0, 1, 2, 3, 4]  # from imr_Sup21k_spormpt.sh
    assert load_config("cub_sup21k_sprompt").settings.train.schedule == "step"
    coda = load_config("imr_sup21k_coda").settings
    assert (coda.pool_size, coda.length, coda.train.epochs, coda.train.lr) == (100, 8, 50, 0.001)
