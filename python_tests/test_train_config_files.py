"""Runs described by files: `gsp-kernels train --config FILE` (YAML or TOML, the flags' names as
keys; recipe < file < flags), the resolved settings every run writes into its folder, and a run
repeated from them with the same metrics."""

import dataclasses
import json

import pytest

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("yaml")

from test_train_files import _fails

from gsp_kernels import cli
from gsp_kernels.training import cli as train_cli
from gsp_kernels.training.config import TrainConfig
from gsp_kernels.training.config_files import (
    INVOCATION_FIELDS,
    read_config_file,
    write_run_config,
)
from gsp_kernels.training.recipes import recipe_config

pytestmark = pytest.mark.usefixtures("single_thread")

# A SmallCNN on the embedded collages: 2 epochs of 2 steps.
TINY_YAML = """\
epochs: 2
steps-per-epoch: 2
batch_size: 20
collages_per_digit: 1
width: 4
embedding_dim: 8
num_prototypes: 4
class_embedding_dim: 4
lr: 1e-3
"""
TINY_TOML = TINY_YAML.replace(": ", " = ")


def _resolved(argv: list[str]) -> TrainConfig:
    """The settings `gsp-kernels train ARGV` would run with."""
    return train_cli._config_from_args(cli.build_parser().parse_args(["train", *argv]))


def _results(folder) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_a_file_sets_the_settings_and_flags_win(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text(TINY_YAML + "pooling: gap\nresize: none\n")
    config = _resolved(["--config", str(settings), "--epochs", "5"])
    assert (config.epochs, config.steps_per_epoch, config.width, config.lr, config.pooling, config.resize) == (5, 2, 4, 1e-3, "gap", None)
    toml = tmp_path / "run.toml"
    toml.write_text(TINY_TOML)
    assert dataclasses.replace(_resolved(["--config", str(toml)]), pooling="gap", resize=None, epochs=5) == config


def test_recipe_then_file_then_flags(tmp_path):
    settings = tmp_path / "cub.yaml"
    settings.write_text(f"recipe: cub\ndata_root: {tmp_path}\nlr: 0.5\nweight_decay: 0.25\n")
    config = _resolved(["--config", str(settings), "--weight-decay", "0.125"])
    recipe = recipe_config("cub")
    assert config.steps_per_epoch == recipe.steps_per_epoch and config.arch == recipe.arch  # the recipe's
    assert config.lr == 0.5 and config.weight_decay == 0.125  # the file's, then the flag's
    assert _resolved(["--config", str(settings), "--recipe", "sop"]).steps_per_epoch == recipe_config("sop").steps_per_epoch


@pytest.mark.parametrize("name, text, expected", [
    ("a.yaml", "bach_size: 4\n", "a.yaml: unknown setting 'bach_size' (did you mean 'batch_size'?)"),
    ("a.toml", "epochs = \"two\"\n", "a.toml: epochs must be an integer, got 'two' (str)"),
    ("a.yaml", "lr: fast\n", "a.yaml: lr must be a number, got 'fast'"),
    ("a.yaml", "amp: 1\n", "a.yaml: amp must be true or false, got 1 (int)"),
    ("a.yaml", "pooling: avg\n", "a.yaml: pooling must be one of gsp, gap, got 'avg'"),
    ("a.yaml", "batch_size: 4\nbatch-size: 8\n", "a.yaml: batch_size is given twice"),
    ("a.yaml", "- 1\n- 2\n", "a.yaml: expected settings as keys and values (a mapping), got a list"),
    ("a.yaml", "epochs: [1\n", "a.yaml: not valid YAML at line 2"),
    ("a.toml", "epochs = \n", "a.toml: not valid TOML"),
    ("a.json", "{}", "a.json: a settings file ends in .yaml, .yml or .toml"),
])
def test_a_bad_file_is_one_line_naming_file_and_key(name, text, expected, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    message = _fails(["train", "--config", str(path)], capsys)
    assert expected in message and str(tmp_path) in message


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert f"{tmp_path / 'none.yaml'}: no such settings file" in _fails(["train", "--config", str(tmp_path / "none.yaml")], capsys)


@pytest.mark.parametrize("kind", ["yaml", "toml"])
def test_the_written_settings_read_back_as_the_run(kind, tmp_path):
    config = dataclasses.replace(recipe_config("cub"), data_root=str(tmp_path / "data \"ü\""), steps_per_epoch=None, output_dir="x",
                                 resume=True)
    path = write_run_config(config, tmp_path, kind)
    assert path.name == f"config.{kind}"
    values = read_config_file(path)
    assert not set(values) & set(INVOCATION_FIELDS)
    assert dataclasses.replace(TrainConfig(), **values) == dataclasses.replace(config, output_dir=None, resume=False)
    other = write_run_config(config, tmp_path, "toml" if kind == "yaml" else "yaml")
    assert [file.name for file in tmp_path.glob("config.*")] == [other.name]  # one settings file per run


@pytest.mark.parametrize("kind", ["yaml", "toml"])
def test_a_run_repeated_from_its_folder_gives_the_same_metrics(kind, tmp_path, capsys):
    settings = tmp_path / f"tiny.{kind}"
    settings.write_text(TINY_YAML if kind == "yaml" else TINY_TOML)
    first, again = tmp_path / "first", tmp_path / "again"
    assert cli.main(["train", "--config", str(settings), "--output-dir", str(first), "--no-progress", "--seed", "3"]) == 0
    written = first / f"config.{kind}"
    assert written.is_file() and not (first / ("config.toml" if kind == "yaml" else "config.yaml")).exists()
    assert cli.main(["train", "--config", str(written), "--output-dir", str(again), "--no-progress"]) == 0
    capsys.readouterr()
    one, two = _results(first), _results(again)
    assert one["config"]["seed"] == two["config"]["seed"] == 3
    assert {**one["config"], "output_dir": None} == {**two["config"], "output_dir": None}
    assert two["metrics"] == one["metrics"]  # bitwise: the CPU run is deterministic
    assert [epoch["loss"] for epoch in two["epochs"]] == [epoch["loss"] for epoch in one["epochs"]]
    assert written.read_text().splitlines()[1:] == (again / f"config.{kind}").read_text().splitlines()[1:]
