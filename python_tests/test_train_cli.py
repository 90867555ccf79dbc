"""`gsp-kernels train` and `gsp-kernels evaluate` end to end on tiny trees in each benchmark's
official layout (python_tests/dataset_fixtures.py): one short run per dataset, results.json,
evaluation of the saved model, and the mlrc protocol's folds and model selection."""

import json

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("torchvision")

import dataset_fixtures as fixtures

from gsp_kernels import cli
from gsp_kernels.training import embeddings, protocols
from gsp_kernels.training.datasets import RECALL_KS, load_benchmark

WRITERS = {
    "cub": fixtures.write_cub,
    "cars196": fixtures.write_cars_classic,
    "cars196-pml": fixtures.write_cars_pml,
    "sop": fixtures.write_sop,
    "inshop": fixtures.write_inshop,
    "imagefolder": fixtures.write_imagefolder,
}
# A SmallCNN on 32x32 crops, a few steps of 2 classes x 2 images.
TINY_FLAGS = ["--arch", "smallcnn", "--width", "4", "--embedding-dim", "8", "--num-prototypes", "4", "--class-embedding-dim", "4",
              "--image-size", "32", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--samples-per-class", "2",
              "--eval-batch-size", "5", "--no-progress"]


pytestmark = pytest.mark.usefixtures("single_thread")


def _run(argv: list[str]) -> None:
    assert cli.main(argv) == 0


@pytest.mark.parametrize("layout", list(WRITERS))
def test_one_short_training_run_per_dataset(layout, tmp_path, capsys):
    name = layout.removesuffix("-pml")
    root = WRITERS[layout](tmp_path / "data")
    out = tmp_path / "run"
    _run(["train", "--dataset", name, "--data-root", str(root), "--output-dir", str(out), *TINY_FLAGS])
    printed = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert record["splits"] == fixtures.EXPECTED[name]
    assert set(record["metrics"]) == {f"recall@{k}" for k in RECALL_KS[name]} | {"map@r", "r_precision"}
    assert all(0.0 <= value <= 1.0 for value in record["metrics"].values())
    assert record["config"]["dataset"] == name and record["config"]["image_size"] == 32
    assert len(record["epochs"]) == 1 and record["images_per_second"] > 0 and record["seconds"] > 0
    assert "recall@1" in printed and f"{RECALL_KS[name][-1]}" in printed
    if name == "inshop":
        assert "query: 3 classes, 3 images" in printed and "gallery: 3 classes, 6 images" in printed
    assert (out / "checkpoint.pt").is_file()
    # the table says which model on which data, and that a tiny tree is not the papers' split
    assert printed.startswith(f"{name}: GSP (4 prototypes, mu 0.3, gamma 5; zero-shot loss x0.1) on smallcnn (random init), 8-d")
    assert "gsp smallcnn 8-d" in printed
    if name == "imagefolder":
        assert record["split_differences"] is None and "WARNING" not in printed
    else:
        assert record["split_differences"] and "WARNING: not the papers' split" in printed
        assert f"train images {fixtures.EXPECTED[name]['train']['images']} (the papers: " in printed


@pytest.mark.parametrize("problem", ["undecodable image", "missing image", "no layout"])
def test_bad_data_is_a_clear_error_before_training(problem, tmp_path, capsys):
    root = fixtures.write_cub(tmp_path / "data")
    images = sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))
    if problem == "undecodable image":
        images[4].write_bytes(b"GIF89a but cut")
        expected = [str(images[4]), "1 of 18 images cannot be read"]
    elif problem == "missing image":
        images[-1].unlink()
        expected = [str(images[-1]), "images listed in", "images.txt are missing"]
    else:
        (root / "CUB_200_2011" / "images.txt").unlink()
        expected = ["images.txt", str(root / "CUB_200_2011")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dataset", "cub", "--data-root", str(root), *TINY_FLAGS[:-1]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("gsp-kernels train: error: ")
    assert all(text in err for text in expected), err
    assert "epoch" not in err and "Traceback" not in err  # stopped before the first step


def test_evaluate_reproduces_the_training_runs_metrics(tmp_path, capsys):
    root = fixtures.write_inshop(tmp_path / "data")
    out = tmp_path / "run"
    _run(["train", "--dataset", "inshop", "--data-root", str(root), "--output-dir", str(out), *TINY_FLAGS])
    trained = json.loads((out / "results.json").read_text())["metrics"]
    capsys.readouterr()
    _run(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--dataset", "inshop", "--data-root", str(root),
          "--output-dir", str(tmp_path / "eval")])
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["metrics"] == trained  # the same weights, test transform and metrics
    assert evaluation["split_differences"] == json.loads((out / "results.json").read_text())["split_differences"]
    assert evaluation["splits"]["gallery"] == {"classes": 3, "images": 6}
    assert "recall@50" in capsys.readouterr().out
    # the dataset and its root default to the checkpoint's
    _run(["evaluate", "--checkpoint", str(out)])
    assert "recall@1" in capsys.readouterr().out


def test_evaluate_reports_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--checkpoint", str(tmp_path / "nothing.pt")])
    assert exit_info.value.code == 2 and "no checkpoint at" in capsys.readouterr().err


CUB_MLRC_CLASSES = (*range(1, 9), 101, 102, 103)  # 8 training classes: four folds of 2


def test_mlrc_folds_are_class_disjoint_and_never_see_the_test_classes(tmp_path, monkeypatch, capsys):
    root = fixtures.write_cub(tmp_path / "data", class_ids=CUB_MLRC_CLASSES, images_per_class=3)
    data = load_benchmark("cub", root)
    train_paths, test_paths = set(data.train.paths), set(data.query.paths)
    validated = []
    original = protocols.validation_map_at_r

    def spy(model, val_set, config, device):
        validated.append(set(val_set.paths))
        return original(model, val_set, config, device)

    monkeypatch.setattr(protocols, "validation_map_at_r", spy)
    out = tmp_path / "run"
    _run(["train", "--dataset", "cub", "--data-root", str(root), "--output-dir", str(out), "--protocol", "mlrc",
          "--early-stopping-patience", "1", *TINY_FLAGS, "--epochs", "3"])
    record = json.loads((out / "results.json").read_text())
    folds = record["folds"]
    assert len(folds) == 4
    held_out = [set(fold["validation_class_ids"]) for fold in folds]
    assert set().union(*held_out) == set(range(8)) and sum(len(classes) for classes in held_out) == 8  # a partition
    for fold in folds:
        assert fold["train"]["classes"] + fold["validation"]["classes"] == 8
        assert fold["train"]["images"] + fold["validation"]["images"] == 24
        assert 1 <= fold["best_epoch"] <= len(fold["epochs"]) <= 3
        assert fold["best_val_map_at_r"] == max(epoch["val_map_at_r"] for epoch in fold["epochs"])
        assert set(fold["metrics"]) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"}
    assert validated and all(paths <= train_paths and not paths & test_paths for paths in validated)
    assert {frozenset(paths) for paths in validated} == {frozenset(p for p in train_paths if _cub_class(p) in fold) for fold in
                                                         [{c + 1 for c in classes} for classes in held_out]}
    assert record["concatenated_dim"] == 4 * 8 and set(record["metrics"]) == set(folds[0]["metrics"])
    for name, value in record["separated_metrics"].items():
        assert value == pytest.approx(sum(fold["metrics"][name] for fold in folds) / 4)
    printed = capsys.readouterr().out
    assert "concatenated (32-d)" in printed and "separated (mean of 4, 8-d)" in printed
    # the four checkpoints hold the selected weights: evaluating them again gives the same numbers
    _run(["evaluate", "--checkpoint", str(out), "--output-dir", str(tmp_path / "eval")])
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["concatenated_dim"] == 32 and evaluation["metrics"] == record["metrics"]
    assert evaluation["separated_metrics"] == record["separated_metrics"]
    assert [model["metrics"] for model in evaluation["models"]] == [fold["metrics"] for fold in folds]


def _cub_class(path: str) -> int:
    """The 1-based CUB class of an image path (its folder is '<class:03d>.<name>')."""
    from pathlib import Path

    return int(Path(path).parent.name.split(".")[0])


def test_a_recipe_trains_end_to_end_with_tiny_overrides(tmp_path):
    root = fixtures.write_cub(tmp_path / "data", class_ids=CUB_MLRC_CLASSES)
    out = tmp_path / "run"
    _run(["train", "--recipe", "cub", "--data-root", str(root), "--output-dir", str(out), *TINY_FLAGS, "--resize", "36",
          "--prototype-memory", "8", "--epochs", "3"])
    record = json.loads((out / "results.json").read_text())
    config = record["config"]
    assert (config["recipe"], config["dataset"], config["arch"], config["image_size"], config["resize"]) == ("cub", "cub", "smallcnn", 32, 36)
    recipe_only = {"optimizer": "adam", "scheduler": "plateau", "freeze_bn": True, "grad_clip": 10.0, "metric_loss": "contrastive",
                   "pooling_method": "gem", "prototype_init": "memory", "transport_ratio": 0.3, "gamma": 5.0}
    assert {key: config[key] for key in recipe_only} == recipe_only
    assert all(1e-6 <= epoch["lr"] <= 1e-5 for epoch in record["epochs"]) and len(record["epochs"]) == 3
    assert record["splits"]["train"] == {"classes": 8, "images": 24}
    assert any("test split" in item for item in record["recipe_not_reproduced"])


def test_concatenate_embeddings_weighs_every_model_equally():
    first = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2
    second = torch.tensor([[10.0], [-0.5]])
    joined = embeddings.concatenate_embeddings([first, second])
    expected = torch.tensor([[0.6, 0.8, 1.0], [0.0, 1.0, -1.0]]) / 2**0.5  # each part unit length, then the whole
    torch.testing.assert_close(joined, expected)
    torch.testing.assert_close(embeddings.concatenate_embeddings([100 * first, second]), expected)
