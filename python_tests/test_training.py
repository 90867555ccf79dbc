"""Training package: datasets, sampler, evaluation, a short training run whose loss falls,
checkpoints, the demo, the CLI subcommands and the training-step benchmark (tiny sizes)."""

import argparse
import json

import pytest
import torch
from torch import nn

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("sklearn")

from test_train_loop import losses_of

from gsp_kernels.bench.training_step import training_step_rows
from gsp_kernels.training import cli as training_cli
from gsp_kernels.training.config import TrainConfig
from gsp_kernels.training.datasets.collage import TILE_SIZE, CollageDataset
from gsp_kernels.training.datasets.images import ImageFolderSplit, split_class_names
from gsp_kernels.training.demo import class_tile_weight_share, run_demo
from gsp_kernels.training.models import build_model
from gsp_kernels.training.report import summary_table
from gsp_kernels.training.run import train
from gsp_kernels.training.samplers import ClassBalancedBatchSampler

pytestmark = pytest.mark.usefixtures("single_thread")


TINY = {"epochs": 2, "width": 8, "embedding_dim": 16, "num_prototypes": 8, "collages_per_digit": 1, "batch_size": 40, "progress": False}


def test_collage_dataset_splits_classes_and_is_deterministic():
    train_set, test_set = CollageDataset("train"), CollageDataset("test")
    assert train_set.images.shape[1:] == (3, 2 * TILE_SIZE, 2 * TILE_SIZE)
    assert set(train_set.digits.tolist()) == {0, 1, 2, 3, 4} and set(test_set.digits.tolist()) == {5, 6, 7, 8, 9}
    assert set(train_set.labels.tolist()) == set(range(5)) == set(test_set.labels.tolist())
    assert len(train_set) == 2 * (train_set.digits.bincount().sum().item() // 2)
    assert train_set.images.min() >= 0 and train_set.images.max() <= 1
    assert torch.equal(CollageDataset("test").images, test_set.images)
    assert not torch.equal(CollageDataset("test", seed=1).images, test_set.images)
    counts = test_set.class_tiles.bincount(minlength=4)
    assert counts.min() > 0.15 * len(test_set)  # the digit tile's position is uniform
    with pytest.raises(ValueError, match="split"):
        CollageDataset("val")


def test_image_folder_split_by_class(tmp_path):
    from PIL import Image

    for class_index in range(4):
        folder = tmp_path / f"class_{class_index}"
        folder.mkdir()
        for image_index in range(2):
            Image.new("RGB", (40, 30), (60 * class_index, 10, 200)).save(folder / f"{image_index}.png")
    (tmp_path / "class_0" / "notes.txt").write_text("not an image")
    train_set = ImageFolderSplit(tmp_path, "train", image_size=24)
    test_set = ImageFolderSplit(tmp_path, "test", image_size=24)
    assert train_set.class_names == ["class_0", "class_1"] and test_set.class_names == ["class_2", "class_3"]
    assert len(train_set) == 4 and train_set.labels.tolist() == [0, 0, 1, 1]
    image, label = train_set[3]
    assert image.shape == (3, 24, 24) and label == 1
    assert test_set[0][0].shape == (3, 24, 24)
    assert split_class_names(["b", "a", "c"], "train", num_train_classes=2) == ["a", "b"]
    with pytest.raises(ValueError, match="--num-train-classes 2: .* set --num-train-classes between 1 and 1"):
        split_class_names(["a", "b"], "train", num_train_classes=2)
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderSplit(tmp_path / "missing")


def test_class_balanced_sampler():
    labels = torch.arange(10).repeat_interleave(6)  # 10 classes x 6
    sampler = ClassBalancedBatchSampler(labels, batch_size=16, samples_per_class=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 60 // 16
    for batch in batches:
        batch_labels = labels[batch]
        assert len(batch) == 16 and batch_labels.unique().numel() == 4
        assert torch.equal(batch_labels, batch_labels.sort().values)  # grouped by class
    assert batches == list(ClassBalancedBatchSampler(labels, 16, 4, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert list(ClassBalancedBatchSampler(labels, 16, 4, seed=3, rank=1, world_size=2)) != batches[:1]
    few = ClassBalancedBatchSampler(torch.tensor([0, 0, 1, 1, 1]), batch_size=8, samples_per_class=2)
    assert few.classes_per_batch == 2 and few.samples_per_class == 4


@pytest.mark.parametrize("pooling", ["gsp", "gap"])
def test_short_training_run_loss_falls_and_checkpoints(pooling, tmp_path):
    config = TrainConfig(pooling=pooling, output_dir=str(tmp_path), scheduler="constant", **{**TINY, "epochs": 3})
    result = train(config)
    losses = [epoch["loss"] for epoch in result["epochs"]]
    assert losses[-1] < losses[0]
    if pooling == "gsp":
        assert all(epoch["zero_shot"] > 0 for epoch in result["epochs"])
    assert 0.0 <= result["map_at_r"] <= result["recall_at_1"] <= 1.0
    assert "recall@1" in summary_table(result) and "images/s" in summary_table(result)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and len(state["history"]) == 3
    resumed = train(TrainConfig(pooling=pooling, output_dir=str(tmp_path), scheduler="constant", resume=True, **{**TINY, "epochs": 4}))
    assert len(resumed["epochs"]) == 4 and losses_of(resumed["epochs"][:3]) == losses_of(result["epochs"])


def test_training_is_deterministic_per_seed():
    first = train(TrainConfig(pooling="gsp", **{**TINY, "epochs": 1}))
    second = train(TrainConfig(pooling="gsp", **{**TINY, "epochs": 1}))
    assert losses_of(first["epochs"]) == losses_of(second["epochs"]) and first["metrics"] == second["metrics"]


def test_class_tile_weight_share():
    dataset = CollageDataset("test")
    gap = build_model("smallcnn", "gap", 16, width=8)
    share, weights = class_tile_weight_share(gap, dataset, torch.device("cpu"))
    assert abs(share - 0.25) < 1e-6 and weights.shape == (len(dataset), 8, 8)


def test_cli_train_and_demo_subcommands(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    training_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "--epochs", "1", "--width", "8", "--embedding-dim", "16", "--num-prototypes", "8",
         "--collages-per-digit", "1", "--batch-size", "40", "--no-progress", "--output-dir", str(tmp_path)]
    )
    assert args.func(args) == 0
    assert "recall@1" in capsys.readouterr().out
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["epochs"] == 1 and record["splits"] == {"train": {"classes": 5, "images": 901}, "test": {"classes": 5, "images": 896}}
    assert set(record["metrics"]) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"}
    assert record["images_per_second"] > 0 and record["epochs"][0]["images_per_second"] > 0
    figure = tmp_path / "demo.png"
    args = parser.parse_args(
        ["demo", "--seeds", "1", "--epochs", "1", "--width", "8", "--embedding-dim", "16", "--num-prototypes", "8",
         "--collages-per-digit", "1", "--batch-size", "40", "--no-progress", "--figure", str(figure)]
    )
    assert args.func(args) == 0
    output = capsys.readouterr().out
    assert "GSP" in output and "GAP" in output and "weight on digit tile" in output
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--pooling", "max"])


def test_run_demo_returns_per_seed_results():
    results = run_demo(seeds=2, epochs=1, collages_per_digit=1, figure_path=None, progress=False,
                       base_config=TrainConfig(width=8, embedding_dim=16, num_prototypes=8, batch_size=40))
    assert len(results["gsp"]["recall_at_1"]) == 2 and "±" in results["table"]
    with pytest.raises(ValueError, match="seeds"):
        run_demo(seeds=0)


def test_training_step_rows_with_a_stand_in_trunk():
    def tiny_trunk():
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()), 8

    rows = training_step_rows("cpu", ["reference"], batch=2, image_size=16, steps=2, warmup=1,
                              embedding_dim=8, num_prototypes=4, trunk_factory=tiny_trunk)
    assert [(row["pooling"], row["backend"]) for row in rows] == [("gap", "-"), ("gsp", "reference")]
    assert rows[0]["overhead_pct"] is None and isinstance(rows[1]["overhead_pct"], float)
    assert all(row["step_ms_median"] > 0 for row in rows)


@pytest.mark.parametrize(
    "overrides, message",
    [({"pooling": "max"}, "pooling"), ({"metric_loss": "triplet"}, "metric_loss"), ({"epochs": 0}, "epochs"), ({"prototype_init": "kmeans"}, "prototype_init")],
)
def test_bad_training_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**overrides))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lr", "-1"], "gsp-kernels train: error: lr must be > 0"),
        (["train", "--dataset", "cub", "--data-root", "/nonexistent/dataset"], "dataset 'cub' reads data_root, which must be a directory"),
        (["train", "--dataset", "sop"], "dataset 'sop' reads data_root, which must be a directory, got None"),
        (["train", "--resize", "100", "--image-size", "128"], "resize must be >= image_size=128"),
        (["train", "--samples-per-class", "61"], "samples_per_class must be in [1, batch_size=60], got 61"),
        (["demo", "--epochs", "0"], "gsp-kernels demo: error: epochs must be >= 1"),
    ],
)
def test_cli_settings_are_checked_before_any_work(argv, message, capsys):
    from gsp_kernels import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
