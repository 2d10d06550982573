"""The data options reach `norga run` through the config, and what the data layer did lands in the run record."""

import json
import os
import subprocess
import sys

import yaml


def norga(*args, env=None):
    return subprocess.run([sys.executable, "-m", "norga", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})


def image_folder_run(root, run_dir, *extra):
    return norga("run", "tiny_smoke", "--run-dir", str(run_dir), "--quiet", "--set", "data.benchmark=imagefolder",
                 "--set", f"data.root={root}", "--set", "data.num_tasks=2", "--set", "data.train_per_class=null",
                 "--set", "data.test_per_class=null", *extra)


def test_an_unreadable_image_stops_the_run_or_is_skipped_and_recorded(make, tmp_path):
    root = make.image_folder(tmp_path / "data", per_class=2)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    failed = image_folder_run(root, tmp_path / "failed")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert f"cannot decode image {root}/train/b/broken.jpg" in failed.stderr
    assert "--set data.skip_unreadable=true" in failed.stderr
    assert not (tmp_path / "failed").exists()  # the data is checked before the run directory is made

    run_dir = tmp_path / "skipping"
    done = image_folder_run(root, run_dir, "--set", "data.skip_unreadable=true")
    assert done.returncode == 0, done.stderr
    record = json.loads((run_dir / "environment.json").read_text())["benchmark"]
    assert record["skipped_unreadable"] == 1 and record["skipped_files"] == [str(root / "train" / "b" / "broken.jpg")]
    assert record["train_images"] == 8 and record["test_images"] == 8 and record["name"] == "imagefolder"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["skip_unreadable"] is True
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks_finished"] == 2 and results["compat"]["fiveds_transform_carryover"] is False
