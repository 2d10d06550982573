"""Config loading: presets, YAML, typed overrides, helpful errors, round trip, preset generation."""

import importlib.util
from pathlib import Path

import pytest

from norga.config import RunConfig
from norga.config_io import ConfigError, dump_config, load_config, preset_names, preset_text

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_ARGS = ROOT.parent / "shared" / "reference" / "official_scripts_effective_args.json"


def test_overrides_of_each_type():
    config = load_config(None, ["wtp.train.epochs=3", "wtp.train.lr=1", "prompt.gate=null", "prompt.layers=[0, 2]",
                                "eval.batchwise_prompt=true", "backbone.timm_kwargs={img_size: 32}", "data.root=/d"])
    assert config.wtp.train.epochs == 3 and config.wtp.train.lr == 1.0 and isinstance(config.wtp.train.lr, float)
    assert config.prompt.gate is None and config.prompt.layers == [0, 2] and config.eval.batchwise_prompt is True
    assert config.backbone.timm_kwargs == {"img_size": 32} and config.data.root == "/d"


@pytest.mark.parametrize(("override", "message"), [
    ("wtp.train.epoch=3", "unknown config key 'wtp.train.epoch' \\(did you mean 'epochs'\\?\\)"),
    ("wtp.trian.epochs=3", "unknown config key 'wtp.trian' \\(did you mean 'train'\\?\\)"),
    ("eval.batchwise_prompt=yes please", "eval.batchwise_prompt must be true or false"),
    ("wtp.train.epochs=2.5", "wtp.train.epochs must be an integer"),
    ("prompt.gate=tahn", "did you mean 'tanh'"),
    ("prompt.prefix_layout=mixed", "must be one of \\['correct', 'official'\\]"),
    ("tii.train.schedule=linear", "must be one of \\['constant', 'step', 'cosine', 'coda_cosine'\\]"),
    ("noequals", "must look like section.key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_preset_and_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'cifar100_sup21k_norg' \\(did you mean 'cifar100_sup21k_norga'\\?\\)"):
        load_config("cifar100_sup21k_norg")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("wtp:\n  train:\n    epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'wtp.train.epochz'"):
        load_config(bad)


def test_partial_yaml_keeps_defaults_and_round_trips(tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("prompt:\n  length: 9\n")
    config = load_config(partial, ["seed=3"])
    assert config.prompt.length == 9 and config.seed == 3 and config.wtp == RunConfig().wtp
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
    assert (c.method, c.prompt.gate, c.prompt.length, c.prompt.momentum) == ("norga", "sigmoid", 5, 0.01)
    assert (c.tii.train.lr, c.tii.train.schedule, c.tii.tap.lr, c.tii.tap.epochs) == (0.00025, "constant", 0.0025, 30)
    assert (c.wtp.train.epochs, c.wtp.train.lr, c.wtp.train.schedule, c.wtp.head_lr_scale) == (50, 0.015, "step", 0.1)
    assert (c.wtp.contrastive_weight, c.wtp.tap.lr, c.wtp.tap.epochs, c.wtp.tap.samples_per_class) == (0.1, 0.05, 80, 640)
    h = load_config("cifar100_sup21k_hide")
    assert h.prompt.gate is None and (h.wtp.tap.lr, h.wtp.tap.epochs) == (0.005, 30)
    i = load_config("imr_sup21k_norga")
    assert (i.wtp.train.epochs, i.wtp.train.schedule, i.prompt.length, i.wtp.contrastive_weight) == (150, "cosine", 20, 0.5)
    cub = load_config("cub_sup21k_norga")
    assert (cub.tii.train.lr, cub.wtp.head_lr_scale, cub.wtp.contrastive_weight, cub.tii.tap.lr) == (0.005, 1.0, 0.01, 0.025)
    five = load_config("5datasets_sup21k_norga")
    assert (five.tii.mlp_hidden, five.prompt.length, five.wtp.train.clip_grad, five.data.num_tasks) == ([4, 4], 40, 2.0, 5)
    assert five.eval.batchwise_prompt is False  # the official True stays a compat switch
    assert "batchwise_prompt true" in preset_text("5datasets_sup21k_norga")
    assert load_config("cifar100_mocov3_norga").prompt.gate == "gelu"


@pytest.mark.skipif(not OFFICIAL_ARGS.is_file(), reason=f"{OFFICIAL_ARGS} not present (it lives in ../shared)")
def test_generator_reproduces_the_committed_presets():
    spec = importlib.util.spec_from_file_location("make_presets", ROOT / "tools" / "make_presets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generated = module.generate(OFFICIAL_ARGS)
    assert len(generated) == 75  # 28 NoRGa / HiDe, 43 L2P / DualPrompt / S-Prompt++ scripts, 4 CODA-Prompt
    for file_name, text in generated.items():
        assert (ROOT / "src" / "norga" / "presets" / file_name).read_text() == text, file_name
