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
from norga.storage import sha256_file

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


#: The bf16 guard's budget: the quickstart's benchmark and backbone with fewer images and epochs (bf16 is emulated,
#: ~8x slower, on CPUs without native bf16, where this test runs it all the same).
GUARD_BUDGET = ("data.train_per_class=30", "data.test_per_class=200", "norga.wtp.train.epochs=1",
                "norga.tii.train.epochs=3", "norga.tii.tap.epochs=10", "norga.wtp.tap.epochs=3")
#: bf16 rounds every matmul input to 8 significant bits (2^-9 relative); over training that moves the prompts and the
#: statistics a little, and a cell changes only by the test images whose prediction was that close to a tie (a cell
#: holds 400 images: 0.25 points each). Measured at this budget (2026-12-01, AMD EPYC AVX2, bf16 emulated; the same
#: bf16 rounding as native kernels, another reduction order): fp32 FA 55.90, bf16 FA 55.85, the largest cell gap 0.5
#: points (2 images), mean 0.12. The bounds leave 5x that for other kernels and machines and stay far below what a
#: broken bf16 path costs (a lost prompt or gate: the quickstart's 10-point gap; wrong-scale features: chance).
GUARD_CELL_POINTS, GUARD_FA_POINTS = 2.5, 1.0


@pytest.mark.realdata
@pytest.mark.slow
@NEEDS_FASHION_MNIST
def test_a_bf16_run_and_an_fp32_run_agree_on_the_accuracy_matrix(tmp_path):
    results = {}
    for amp in ("none", "bf16"):
        run_dir = tmp_path / amp
        command = [sys.executable, "-m", "norga", "run", "quickstart", "--quiet", "--run-dir", str(run_dir),
                   "--set", f"amp={amp}", *(arg for setting in GUARD_BUDGET for arg in ("--set", setting))]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr
        assert json.loads((run_dir / "environment.json").read_text())["precision"]["amp"] == amp  # what ran
        results[amp] = json.loads((run_dir / "results.json").read_text())
    matrices = {amp: results[amp]["matrices"]["accuracy"] for amp in results}
    assert matrices["none"]["total"] == matrices["bf16"]["total"]  # the same test images in every cell
    cells = [(row, column) for row, values in enumerate(matrices["none"]["accuracy"])
             for column, value in enumerate(values) if value is not None]
    assert len(cells) == 15  # 5 tasks: every seen task after every task
    gaps = [abs(matrices["none"]["accuracy"][r][c] - matrices["bf16"]["accuracy"][r][c]) for r, c in cells]
    assert max(gaps) <= GUARD_CELL_POINTS, gaps
    fa = {amp: results[amp]["metrics"]["final_average_accuracy"] for amp in results}
    assert abs(fa["none"] - fa["bf16"]) <= GUARD_FA_POINTS, fa
    assert fa["none"] > 40  # learnt something (chance: 10 %): agreement of two broken runs would mean nothing
