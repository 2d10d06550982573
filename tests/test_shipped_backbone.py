"""The shipped norga-vit-tiny-c10 backbone and the offline quickstart that uses it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_fixture import NEEDS_FASHION_MNIST

from norga.assets import SHIPPED_SHA256, shipped_weights
from norga.backbones import create_backbone
from norga.io_utils import sha256_file

REAL = os.environ.get("NORGA_DATA")


def test_shipped_weights_load_strictly_with_their_card():
    path = shipped_weights("norga-vit-tiny-c10")
    assert path is not None and sha256_file(path) == SHIPPED_SHA256["norga-vit-tiny-c10"]
    model, record = create_backbone("norga-vit-tiny-c10", weights="package")
    assert record.sha256 == SHIPPED_SHA256["norga-vit-tiny-c10"] and record.layout == "safetensors"
    assert len(model.blocks) == 6 and record.input_size == (3, 32, 32)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["test_accuracy"] > 50 and card["recipe"]["timm_kwargs"] == {"img_size": 32, "patch_size": 4, "depth": 6}
    # really pretrained: features of different images differ far more than a random init's CLS token would
    features = model.forward_head(model.forward_features(torch.randn(8, 3, 32, 32)), pre_logits=True)
    assert features.std(dim=0).mean() > 0.1


@pytest.mark.realdata
@pytest.mark.slow
@NEEDS_FASHION_MNIST
def test_quickstart_runs_both_methods_offline(tmp_path):
    result = subprocess.run([sys.executable, "-m", "norga", "quickstart", "--output-dir", str(tmp_path), "--quiet"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "NoRGa" in result.stdout and "HiDe-Prompt" in result.stdout and "FFM" in result.stdout
    runs = sorted(p.name.split("-2")[0] for p in tmp_path.iterdir())
    assert runs == ["quickstart-hide-prompt", "quickstart-norga"]
    for run in tmp_path.iterdir():
        results = json.loads((run / "results.json").read_text())
        assert results["tasks_finished"] == 5 and results["metrics"]["final_average_accuracy"] > 40  # chance is 20
        assert (run / "accuracy_matrix.png").is_file() and (run / "accuracy_curve.png").is_file()
