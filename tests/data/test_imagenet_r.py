"""ImageNet-R: a deterministic, versioned 80/20 split manifest; files never moved; clear errors."""

import json
import random
from pathlib import Path

import pytest

from norga.config import DataConfig
from norga.data import (
    DataLayoutError,
    build_benchmark,
    make_split_manifest,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from norga.data.manifest import main as manifest_main


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_split_manifest_is_deterministic_and_per_class_80_20(make, tmp_path):
    root = make.imagenet_r(num_classes=4, per_class=10)
    before = snapshot(root)
    manifest = make_split_manifest(root, "imagenet-r")
    assert manifest == make_split_manifest(root, "imagenet-r")
    for c in manifest["classes"]:
        assert sum(f.startswith(c + "/") for f in manifest["train"]) == 8
        assert sum(f.startswith(c + "/") for f in manifest["test"]) == 2
    assert not set(manifest["train"]) & set(manifest["test"]) and manifest["train"] == sorted(manifest["train"])
    assert make_split_manifest(root, "imagenet-r", seed=1)["sha256"] != manifest["sha256"]
    assert snapshot(root) == before  # nothing moved, nothing deleted


def test_manifest_round_trip_and_tampering(make, tmp_path):
    root = make.imagenet_r(num_classes=3, per_class=5)
    manifest = make_split_manifest(root, "imagenet-r", hash_contents=True)
    path = write_manifest(manifest, tmp_path / "split.json")
    assert read_manifest(path) == manifest
    verify_manifest(manifest, root, contents=True)
    with pytest.raises(FileExistsError):
        write_manifest(manifest, path)
    edited = json.loads(path.read_text())
    edited["test"].append(edited["train"].pop())
    path.write_text(json.dumps(edited))
    with pytest.raises(DataLayoutError, match="sha256 does not match"):
        read_manifest(path)
    victim = root / random.choice(manifest["test"])
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(DataLayoutError, match="differ from those the manifest was made from"):
        verify_manifest(manifest, root, contents=True)
    victim.unlink()
    with pytest.raises(DataLayoutError, match=f"1 of 15 files .* missing .*{victim.name}"):
        verify_manifest(manifest, root)


def test_imagenet_r_benchmark_uses_the_manifest(make, tmp_path):
    root = make.imagenet_r()
    before = snapshot(root)
    bench = build_benchmark(DataConfig("imagenet-r", root=tmp_path), seed=42, image_size=8)
    assert bench.num_classes == 200 and len(bench.tasks) == 10 and all(len(t.classes) == 20 for t in bench.tasks)
    assert [len(t.train) for t in bench.tasks] == [80] * 10 and [len(t.test) for t in bench.tasks] == [20] * 10
    record = bench.record()["split_manifest"]
    assert record["sha256"] == make_split_manifest(root, "imagenet-r")["sha256"] and record["version"] == 1
    assert "generated" in record["source"]
    # an explicit manifest is used as given (here: another seed's split), and recorded
    other = make_split_manifest(root, "imagenet-r", seed=3)
    path = write_manifest(other, tmp_path / "other.json")
    explicit = build_benchmark(DataConfig("imagenet-r", root=tmp_path, split_manifest=path, memory_budget_mb=0),
                               image_size=8)
    assert explicit.record()["split_manifest"] == {"source": str(path), "version": 1, "sha256": other["sha256"]}
    test_files = {str(p.relative_to(root)) for t in explicit.tasks for p in t.test.images}
    assert test_files == set(other["test"])
    assert explicit.tasks[0].train[0][0].shape == (3, 8, 8)
    assert snapshot(root) == before


def test_imagenet_r_errors(make, tmp_path):
    root = make.imagenet_r(num_classes=199, per_class=2)
    with pytest.raises(DataLayoutError, match="found 199 classes, imagenet-r has 200"):
        build_benchmark(DataConfig("imagenet-r", root=tmp_path))
    moved = tmp_path / "official" / "imagenet-r"
    (moved / "train" / "n0").mkdir(parents=True)
    (moved / "test" / "n0").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="official code's split moved the files.*Extract imagenet-r.tar again"):
        build_benchmark(DataConfig("imagenet-r", root=tmp_path / "official"))
    manifest = make_split_manifest(root, "imagenet-r")
    path = write_manifest(manifest, tmp_path / "m.json")
    (root / manifest["train"][0]).unlink()
    with pytest.raises(DataLayoutError, match="missing under"):
        build_benchmark(DataConfig("imagenet-r", root=tmp_path, split_manifest=path))
    with pytest.raises(ValueError, match="split_manifest only applies to imagenet-r"):
        build_benchmark(DataConfig("cub200", root=tmp_path, split_manifest=path))


def test_manifest_command_line_makes_and_verifies(make, tmp_path, capsys):
    root = make.imagenet_r(num_classes=2, per_class=5)
    out = tmp_path / "m.json"
    assert manifest_main(["make", str(root), "--out", str(out), "--hash-contents"]) == 0
    manifest = read_manifest(out)
    assert manifest["sha256"] in capsys.readouterr().out and "contents_sha256" in manifest
    assert manifest_main(["verify", str(out), str(root), "--contents"]) == 0
    assert "redraws this exact split" in capsys.readouterr().out
    extra = root / manifest["classes"][0] / "extra.jpg"  # a file the manifest was not made from
    extra.write_bytes((root / manifest["train"][0]).read_bytes())
    assert manifest_main(["verify", str(out), str(root)]) == 1
    assert "redraws a different split" in capsys.readouterr().out
    (root / manifest["test"][0]).unlink()
    assert manifest_main(["verify", str(out), str(root)]) == 1
    assert f"FAILED: 1 of 10 files of the imagenet-r split manifest are missing under {root}" in capsys.readouterr().out


def test_the_shipped_manifest_is_package_data_and_preferred(make, tmp_path, monkeypatch):
    import tomllib

    import norga
    from norga.data import folders

    pyproject = Path(norga.__file__).parents[2] / "pyproject.toml"
    if pyproject.is_file():  # a source checkout (editable install): the folder is declared as package data
        assert "manifests/*" in tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["norga"]
    assert folders.shipped_manifest("README.md") == Path(norga.__file__).parent / "manifests" / "README.md"
    shipped = folders.shipped_manifest()
    assert shipped is None or read_manifest(shipped)["dataset"] == "imagenet-r"
    root = make.imagenet_r(per_class=3)
    fixture = write_manifest(make_split_manifest(root, "imagenet-r", seed=5), tmp_path / "shipped.json")
    monkeypatch.setattr(folders, "shipped_manifest", lambda: fixture)
    bench = build_benchmark(DataConfig("imagenet-r", root=tmp_path), image_size=8)
    assert bench.record()["split_manifest"]["source"] == str(fixture)
    assert bench.record()["split_manifest"]["sha256"] == read_manifest(fixture)["sha256"]
