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
    ("method=dualpromt", "did you mean 'dualprompt'"),
    ("dualprompt.gate=tahn", "did you mean 'tanh'"),
    ("l2p.prompt_type=prompt", "must be one of \\['prefix', 'tokens'\\]"),
    ("sprompt.train_selection=random", "must be one of \\['task', 'similarity'\\]"),
    ("coda.ortho_wieght=0.1", "unknown config key 'coda.ortho_wieght' \\(did you mean 'ortho_weight'\\?\\)"),
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


def test_method_sections_keep_their_own_defaults_when_partly_given(tmp_path):
    partial = tmp_path / "l2p.yaml"
    partial.write_text("method: l2p\nl2p:\n  top_k: 3\n  train: {epochs: 2}\n")
    config = load_config(partial, ["dualprompt.gate=sigmoid", "coda.train.lr=0.002"])
    assert (config.l2p.top_k, config.l2p.pool_size, config.l2p.prompt_type, config.l2p.layers) == (3, 30, "tokens", [0])
    assert (config.l2p.train.epochs, config.l2p.train.lr) == (2, 0.0025)  # the section's lr, not OptimConfig's
    assert config.dualprompt.gate == "sigmoid" and config.dualprompt.g_layers == [0, 1]
    assert (config.coda.train.lr, config.coda.train.schedule, config.coda.train.clip_grad) == (0.002, "coda_cosine", None)
    assert config.sprompt.layers == [0, 1, 2, 3, 4] and config.sprompt.g_length == 0


def test_method_names_known_without_torch_match_the_registry():
    from norga.config_io import METHOD_NAMES
    from norga.methods import METHODS

    assert set(METHOD_NAMES) == set(METHODS)


def test_baseline_presets_match_the_official_scripts():
    """NORGA_SPEC §1.8 rows."""
    l2p = load_config("cifar100_sup21k_l2p")
    assert (l2p.method, l2p.l2p.pool_size, l2p.l2p.top_k, l2p.l2p.length, l2p.l2p.layers) == ("l2p", 30, 5, 5, [0])
    assert (l2p.l2p.prompt_type, l2p.l2p.train_selection, l2p.l2p.pull_weight, l2p.l2p.train.epochs) == (
        "tokens", "similarity", 0.1, 10)
    dual = load_config("imr_sup21k_dualprompt")
    assert (dual.dualprompt.g_layers, dual.dualprompt.g_length, dual.dualprompt.layers, dual.dualprompt.length) == (
        [0, 1], 5, [2, 3, 4], 20)
    assert (dual.dualprompt.train.lr, dual.dualprompt.train.epochs, dual.dualprompt.train_selection) == (0.0025, 50, "task")
    five = load_config("5datasets_sup21k_dualprompt")
    assert (five.dualprompt.pool_size, five.dualprompt.length, five.dualprompt.g_length, five.dualprompt.pull_weight,
            five.dualprompt.train.epochs) == (5, 40, 10, 0.5, 40)
    assert five.eval.batchwise_prompt is False and "batchwise_prompt true" in preset_text("5datasets_sup21k_dualprompt")
    assert load_config("cifar100_sprompt").sprompt.train.epochs == 40  # the script without a backbone tag
    assert load_config("imr_sup21k_sprompt").sprompt.layers == [0, 1, 2, 3, 4]  # from imr_Sup21k_spormpt.sh
    assert load_config("cub_sup21k_sprompt").sprompt.train.schedule == "step"
    coda = load_config("imr_sup21k_coda")
    assert (coda.coda.pool_size, coda.coda.length, coda.coda.train.epochs, coda.coda.train.lr) == (100, 8, 50, 0.001)
