"""From a trained run to its use: ``gsp_kernels.load_model`` gives back the model training
tested (a run folder, a checkpoint or best.pt file, an mlrc run as the ensemble the protocol
evaluates), ``--validation-classes`` keeps the best validation epoch as best.pt, and
``gsp-kernels embed`` writes a split's or a folder's embeddings to .npz and .safetensors files
that hold what the model computes."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("torchvision")

import dataset_fixtures as fixtures
from test_train_files import _fails, _plant_checkpoint

import gsp_kernels
from gsp_kernels import cli
from gsp_kernels.training.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint
from gsp_kernels.training.config import RunError, TrainConfig, validate_config
from gsp_kernels.training.datasets import held_out_classes
from gsp_kernels.training.datasets.collage import CollageDataset
from gsp_kernels.training.embeddings import (
    compute_embeddings,
    concatenate_embeddings,
    retrieval_scores,
)
from gsp_kernels.training.evaluate import evaluate_checkpoints
from gsp_kernels.training.loading import EnsembleEmbeddingModel
from gsp_kernels.training.run import train

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"epochs": 3, "width": 4, "embedding_dim": 8, "num_prototypes": 4, "class_embedding_dim": 4, "collages_per_digit": 1,
        "batch_size": 20, "steps_per_epoch": 2, "progress": False}


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    """A standard collage run holding out 40% of its training classes: (result, folder)."""
    folder = tmp_path_factory.mktemp("validated") / "run"
    return train(TrainConfig(**TINY, output_dir=str(folder), validation_classes=0.4)), folder


def _test_images() -> torch.Tensor:
    return torch.stack([CollageDataset("test", 1, seed=0)[index][0] for index in range(5)])  # [5, 3, H, W]


def test_load_model_gives_the_model_training_tested(validated_run):
    result, folder = validated_run
    model = gsp_kernels.load_model(folder)
    assert not model.training and model.config == TrainConfig(**{**TINY, "validation_classes": 0.4})
    images = _test_images()
    with torch.no_grad():
        want = result["model"].eval()(images).embedding
        got = model(images)
    assert got.embedding.shape == (5, 8) and torch.equal(got.embedding, want)
    assert gsp_kernels.load_model(folder / BEST_NAME).which == "best"


def test_the_best_validation_epoch_is_kept_as_best_pt(validated_run):
    result, folder = validated_run
    scores = [epoch["val_map_at_r"] for epoch in result["epochs"]]
    assert result["best_epoch"] == 1 + max(range(len(scores)), key=scores.__getitem__)
    assert result["best_val_map_at_r"] == max(scores)
    best = torch.load(folder / BEST_NAME, weights_only=True)
    assert best["epoch"] + 1 == result["best_epoch"] and best["val_map_at_r"] == max(scores)
    last = gsp_kernels.load_model(folder, which="last")
    assert last.which == "last" and last.epoch == TINY["epochs"] - 1
    checkpoint = load_checkpoint(folder / CHECKPOINT_NAME)
    last_weights = {key[len("model."):]: value for key, value in checkpoint["objective"].items() if key.startswith("model.")}
    assert all(torch.equal(last.state_dict()[key], value) for key, value in last_weights.items())
    # the held-out classes are disjoint from the training ones, and the test set never seen
    assert result["validation"]["classes"] == 2 and len(result["validation"]["class_ids"]) == 2
    evaluated = {which: evaluate_checkpoints([folder], which=which) for which in ("best", "last")}
    assert evaluated["best"]["metrics"] == result["metrics"]
    assert [entry["epoch"] for entry in evaluated["last"]["models"]] == [TINY["epochs"]]


def test_held_out_classes_are_whole_classes():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    train_indices, held_out = held_out_classes(labels, 0.4, seed=3)
    assert len(set(labels[held_out].tolist())) == 2 and not set(labels[held_out].tolist()) & set(labels[train_indices].tolist())
    assert sorted(train_indices.tolist() + held_out.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="leaves 1 to train on"):
        held_out_classes(labels, 0.8)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="validation_classes"):
            validate_config(TrainConfig(validation_classes=bad))
    with pytest.raises(ValueError, match="mlrc validates on its folds"):
        validate_config(TrainConfig(validation_classes=0.2, protocol="mlrc"))


def test_an_mlrc_run_loads_as_the_ensemble_it_was_evaluated_as(tmp_path):
    folder = tmp_path / "mlrc"
    result = train(TrainConfig(**{**TINY, "epochs": 1}, protocol="mlrc", num_folds=2, output_dir=str(folder)))
    assert (folder / "fold1" / BEST_NAME).is_file() and (folder / "fold2" / BEST_NAME).is_file()
    model = gsp_kernels.load_model(folder)
    assert isinstance(model, EnsembleEmbeddingModel) and len(model.models) == 2 and model.config.protocol == "mlrc"
    images = _test_images()
    with torch.no_grad():
        want = concatenate_embeddings([fold(images).embedding for fold in result["models"]])
        assert torch.allclose(model(images).embedding, want, rtol=0, atol=1e-6)
    test_set = CollageDataset("test", 1, seed=0)
    embeddings = compute_embeddings(model, test_set, torch.device("cpu"))
    data = type("Data", (), {"query": test_set, "gallery": None, "recall_ks": (1, 2, 4, 8)})
    assert retrieval_scores(data, embeddings, None)["map@r"] == pytest.approx(result["metrics"]["map@r"], abs=1e-6)


def test_load_model_refuses_files_that_would_run_code_or_are_no_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    planted = _plant_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, "os.system", marker)
    for path in (planted, planted.parent):
        with pytest.raises(RunError, match="refused to load"):
            gsp_kernels.load_model(path)
    assert not marker.exists()
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(RunError, match="not a checkpoint written by gsp-kernels train"):
        gsp_kernels.load_model(tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        gsp_kernels.load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="which must be one of"):
        gsp_kernels.load_model(planted, which="first")


def test_embed_writes_what_the_model_computes(validated_run, tmp_path, capsys):
    _, folder = validated_run
    model = gsp_kernels.load_model(folder)
    test_set = CollageDataset("test", 1, seed=0)
    want = compute_embeddings(model, test_set, torch.device("cpu"))
    assert cli.main(["embed", "--checkpoint", str(folder), "--dataset", "collage", "--output", str(tmp_path / "e.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "e.npz") as saved:  # no pickle: the arrays load with allow_pickle=False
        assert saved["embeddings"].dtype == np.float32 and np.array_equal(saved["embeddings"], want.numpy())
        assert np.array_equal(saved["labels"], test_set.labels.numpy()) and saved["paths"][3] == "3"


def test_embed_a_folder_and_a_benchmark_split_with_relative_paths(validated_run, tmp_path):
    from safetensors import safe_open

    _, folder = validated_run
    images = fixtures.write_imagefolder(tmp_path / "images", classes=2, images_per_class=2)
    (images / "class_0" / "notes.txt").write_text("not an image")
    output = tmp_path / "folder.safetensors"
    assert cli.main(["embed", "--checkpoint", str(folder), "--images", str(images), "--output", str(output), "--no-progress"]) == 0
    with safe_open(str(output), "pt") as saved:
        metadata, embeddings = saved.metadata(), saved.get_tensor("embeddings")
        labels = saved.get_tensor("labels")
    paths = json.loads(metadata["paths"])
    assert paths == ["class_0/0.png", "class_0/1.png", "class_1/0.png", "class_1/1.png"]
    assert json.loads(metadata["labels"]) == [-1] * 4 and labels.tolist() == [-1] * 4 and embeddings.shape == (4, 8)
    root = fixtures.write_imagefolder(tmp_path / "bench", classes=4, images_per_class=2)
    output = tmp_path / "train.npz"
    assert cli.main(["embed", "--checkpoint", str(folder), "--dataset", "imagefolder", "--data-root", str(root), "--split", "train",
                     "--output", str(output), "--no-progress"]) == 0
    with np.load(output) as saved:
        assert saved["paths"].tolist() == ["class_0/0.png", "class_0/1.png", "class_1/0.png", "class_1/1.png"]
        assert saved["labels"].tolist() == [0, 0, 1, 1]
        assert np.array_equal(saved["embeddings"][:2], embeddings[:2].numpy())  # the same two files, the same transform


@pytest.mark.parametrize("flags, expected", [
    (["--output", "e.txt", "--dataset", "collage"], "end the name in .npz or .safetensors"),
    (["--output", "e.npz"], "pass --images DIR"),
    (["--output", "e.npz", "--images", "nowhere", "--dataset", "collage"], "pass --images DIR"),
    (["--output", "e.npz", "--images", "nowhere"], "is not a folder"),
    (["--output", "e.npz", "--dataset", "collage", "--split", "gallery"], "no gallery set"),
    (["--output", "e.npz", "--dataset", "cub"], "needs --data-root"),
])
def test_embed_mistakes_are_one_line(validated_run, tmp_path, capsys, monkeypatch, flags, expected):
    _, folder = validated_run
    monkeypatch.chdir(tmp_path)
    assert expected in _fails(["embed", "--checkpoint", str(folder), *flags, "--no-progress"], capsys)
