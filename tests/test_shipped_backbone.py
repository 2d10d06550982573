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


#: The quickstart's promise: NoRGa's FA at least 3 points above the same pipeline without prompts (10.5 measured);
#: the test fails below half of that.
MIN_FA_GAIN = 1.5


@pytest.mark.realdata
@pytest.mark.slow
@NEEDS_FASHION_MNIST
def test_the_quickstart_runs_three_rows_offline_and_the_prompts_measurably_matter(tmp_path):
    result = subprocess.run([sys.executable, "-m", "norga", "quickstart", "--output-dir", str(tmp_path), "--quiet"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert all(label in result.stdout for label in ("NoRGa", "HiDe-Prompt", "No prompts", "FFM", "task-IL"))
    runs = {p.name.split("-2")[0]: p for p in tmp_path.iterdir()}
    assert sorted(runs) == ["quickstart-hide-prompt", "quickstart-no-prompts", "quickstart-norga"]
    results = {name: json.loads((run / "results.json").read_text()) for name, run in runs.items()}
    for name, run in runs.items():
        assert results[name]["tasks_finished"] == 5 and results[name]["metrics"]["final_average_accuracy"] > 40
        assert (run / "accuracy_matrix.png").is_file() and (run / "accuracy_curve.png").is_file()
    assert results["quickstart-no-prompts"]["settings"]["prompt"]["length"] == 0
    norga, bare = results["quickstart-norga"], results["quickstart-no-prompts"]
    gain = norga["metrics"]["final_average_accuracy"] - bare["metrics"]["final_average_accuracy"]
    assert gain >= MIN_FA_GAIN, f"the prompts add {gain:.2f} FA points, below {MIN_FA_GAIN}"
    assert f"FA {gain:+.2f}" in result.stdout  # the closing lines say it
    assert "NoRGa's gates (blocks" in result.stdout
