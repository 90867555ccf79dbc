"""Recipes: each benchmark's recipe resolves to the settings OFFICIAL_CODE.md documents (and
the transforms and optimizer built from them are those settings), an explicit flag wins over
a recipe, and runs without a recipe keep the defaults."""

import argparse
import dataclasses

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("torchvision")

import dataset_fixtures as fixtures

from gsp_kernels.training import cli as training_cli
from gsp_kernels.training.config import TrainConfig
from gsp_kernels.training.loop import build_optimizer, build_scheduler
from gsp_kernels.training.recipes import RECIPES, recipe_config, recipe_overrides
from gsp_kernels.training.run import load_data

# The authors' settings (OFFICIAL_CODE.md, tensorflow/configs/*.yaml), written out by hand.
EVERY_RECIPE = {"transport_ratio": 0.3, "gamma": 5.0, "zero_shot_weight": 0.1, "samples_per_class": 4, "optimizer": "adam",
                "freeze_bn": True, "image_size": 227, "resize": 256, "grad_clip": 10.0, "pooling": "gsp", "arch": "resnet50",
                "prototype_init": "memory", "prototype_memory": 1024, "warm_up_steps": 0}
CONVENTIONAL = {"embedding_dim": 512, "class_embedding_dim": 512, "batch_size": 112, "scheduler": "plateau", "plateau_factor": 0.5,
                "min_lr": 1e-6, "weight_decay": 4e-4, "metric_loss": "contrastive", "contrastive_neg_margin": 1.0, "protocol": "standard"}
SMALL = {"num_prototypes": 64, "lr": 1e-5, "plateau_patience": 4, "pooling_method": "gem", "augment_max_pool": False}
LARGE = {"num_prototypes": 128, "lr": 1e-4, "plateau_patience": 3, "pooling_method": "sum", "augment_max_pool": True}
MLRC = {"protocol": "mlrc", "num_folds": 4, "embedding_dim": 128, "batch_size": 32, "lr": 1e-5, "scheduler": "constant",
        "pooling_method": "sum", "augment_max_pool": False}
MLRC_SMALL = {"num_prototypes": 64, "steps_per_epoch": 100, "early_stopping_patience": 15}
MLRC_LARGE = {"num_prototypes": 128, "steps_per_epoch": 1000, "early_stopping_patience": 10}
SIZE = {"cub": "small", "cars196": "small", "sop": "large", "inshop": "large"}


@pytest.mark.parametrize("name", ["cub", "cars196", "sop", "inshop"])
def test_recipes_resolve_to_the_documented_settings(name):
    small = SIZE[name] == "small"
    config = recipe_config(name)
    expected = {"dataset": name, "recipe": name, **EVERY_RECIPE, **CONVENTIONAL, **(SMALL if small else LARGE)}
    assert {key: getattr(config, key) for key in expected} == expected
    config = recipe_config(name, "mlrc")
    expected = {"dataset": name, **EVERY_RECIPE, **MLRC, **(MLRC_SMALL if small else MLRC_LARGE)}
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.batch_size // config.samples_per_class == 8  # 8 classes x 4 images


def test_a_recipe_builds_the_documented_transforms_and_optimizer(tmp_path):
    from torchvision import transforms

    root = fixtures.write_cub(tmp_path)
    config = recipe_config("cub", data_root=str(root))
    data = load_data(config)
    train_steps = data.train.transform.transforms
    assert isinstance(train_steps[0], transforms.RandomResizedCrop) and train_steps[0].size == (227, 227)
    assert train_steps[0].scale == (0.16, 1.0) and isinstance(train_steps[1], transforms.RandomHorizontalFlip)
    test_steps = data.query.transform.transforms
    assert isinstance(test_steps[0], transforms.Resize) and test_steps[0].size == 256
    assert isinstance(test_steps[1], transforms.CenterCrop) and test_steps[1].size == (227, 227)
    assert data.query.transform is not data.train.transform
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer(config, [parameter])
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 1e-5 and optimizer.defaults["weight_decay"] == 4e-4
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=25)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler.factor == 0.5 and scheduler.patience == 4 and scheduler.min_lrs == [1e-6]


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    training_cli.register(parser.add_subparsers(dest="command"))
    return training_cli._config_from_args(parser.parse_args(argv))


def test_explicit_flags_override_a_recipe(tmp_path):
    root = str(tmp_path)
    config = _parse(["train", "--recipe", "sop", "--data-root", root, "--lr", "3e-5", "--no-freeze-bn", "--num-prototypes", "32",
                     "--steps-per-epoch", "none", "--arch", "resnet18"])
    assert (config.lr, config.freeze_bn, config.num_prototypes, config.steps_per_epoch, config.arch) == (3e-5, False, 32, None, "resnet18")
    untouched = {key: value for key, value in recipe_overrides("sop").items() if key not in ("lr", "freeze_bn", "num_prototypes", "steps_per_epoch", "arch")}
    assert {key: getattr(config, key) for key in untouched} == untouched
    assert config.data_root == root and config.recipe == "sop"
    mlrc = _parse(["train", "--recipe", "cub", "--protocol", "mlrc", "--data-root", root, "--early-stopping-patience", "3"])
    assert (mlrc.protocol, mlrc.embedding_dim, mlrc.early_stopping_patience, mlrc.steps_per_epoch) == ("mlrc", 128, 3, 100)
    # a recipe's dataset can be pointed elsewhere too
    assert _parse(["train", "--recipe", "cub", "--dataset", "imagefolder", "--data-root", root]).dataset == "imagefolder"


def test_without_a_recipe_the_defaults_stay():
    parsed = _parse(["train"])
    assert parsed == dataclasses.replace(TrainConfig(), progress=True)
    assert _parse(["train", "--amp", "--no-progress"]) == dataclasses.replace(TrainConfig(), amp=True, progress=False)


def test_without_a_recipe_a_real_backbone_gets_the_papers_layer_sizes(tmp_path):
    """--arch other than smallcnn: 512-d, 64 prototypes, 512-d class embeddings (the paper's and
    the recipes' sizes) unless a flag says otherwise; the small CNN keeps the small sizes."""
    sizes = lambda c: (c.embedding_dim, c.num_prototypes, c.class_embedding_dim)  # noqa: E731
    assert sizes(_parse(["train", "--arch", "resnet18"])) == (512, 64, 512)
    assert sizes(_parse(["train", "--arch", "timm:vit_tiny_patch16_224"])) == (512, 64, 512)
    assert sizes(_parse(["train", "--arch", "resnet18", "--embedding-dim", "128", "--num-prototypes", "32"])) == (128, 32, 512)
    assert sizes(_parse(["train", "--arch", "smallcnn"])) == sizes(TrainConfig()) == (64, 16, 32)
    mlrc = _parse(["train", "--recipe", "cub", "--protocol", "mlrc", "--arch", "resnet18", "--data-root", str(tmp_path)])
    assert sizes(mlrc)[0] == 128  # the recipe's


def test_bad_recipe_or_override():
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipe_config("mnist")
    with pytest.raises(ValueError, match="protocol must be one of"):
        recipe_overrides("cub", "kfold")
    with pytest.raises(TypeError, match="unknown TrainConfig field"):
        recipe_config("cub", learning_rate=1.0)
    with pytest.raises(SystemExit):
        _parse(["train", "--recipe", "mnist"])
    assert set(RECIPES) == {"cub", "cars196", "sop", "inshop"}


def test_the_summary_title_names_the_recipes_settings():
    from gsp_kernels.training.report import model_label, run_title

    assert run_title(recipe_config("cub")) == (
        "cub, recipe cub: GSP (64 prototypes, mu 0.3, gamma 5, gem; zero-shot loss x0.1) on resnet50 (random init), 512-d, "
        "contrastive loss; 200 epochs of 25 steps, batches of 112")
    sop = run_title(recipe_config("sop", "mlrc", pretrained="weights.pth"))
    assert sop.startswith("sop, recipe sop, protocol mlrc: GSP (128 prototypes, mu 0.3, gamma 5; zero-shot")
    assert "resnet50 (weights weights.pth), 128-d" in sop
    assert "4 folds, each at most 10000 epochs of 1000 steps (early stopping patience 10), batches of 32" in sop
    assert "max-pool branch" in run_title(recipe_config("inshop"))
    gap = recipe_config("cars196", pooling="gap", steps_per_epoch=None)
    assert run_title(gap).startswith("cars196, recipe cars196: GAP on resnet50") and "of one pass" in run_title(gap)
    assert model_label(gap) == "gap resnet50 512-d"
