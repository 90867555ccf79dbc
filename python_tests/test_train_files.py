"""The files a training run reads and writes: checkpoints load without running code from them
(through `gsp-kernels evaluate`, `train --resume` and every Python loader), hold only tensors and
plain values, and resume exactly; a run never loses a previous one (a folder holding a checkpoint
is refused without --resume or --overwrite, an unwritable folder is found before any data is read,
a full disk keeps the last checkpoint and leaves nothing partial, results files are written
atomically)."""

import errno
import json
import os
import pathlib
import random

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("torchvision")

import dataset_fixtures as fixtures

from gsp_kernels import cli
from gsp_kernels.training import checkpoint, files, run
from gsp_kernels.training.config import RunError, TrainConfig
from gsp_kernels.training.evaluate import evaluate_checkpoints
from gsp_kernels.training.run import train

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_FLAGS = ["--arch", "smallcnn", "--width", "4", "--embedding-dim", "8", "--num-prototypes", "4", "--class-embedding-dim", "4",
              "--image-size", "32", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--samples-per-class", "2",
              "--eval-batch-size", "5", "--no-progress"]
TINY = {"epochs": 2, "width": 4, "embedding_dim": 8, "num_prototypes": 4, "class_embedding_dim": 4, "collages_per_digit": 1,
        "batch_size": 20, "steps_per_epoch": 2, "progress": False}


def _fails(argv: list[str], capsys) -> str:
    """The one stderr line of a CLI call that must end with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gsp-kernels {argv[0]}: error: "), err
    return lines[0]


def _train_flags(tmp_path, out) -> list[str]:
    root = tmp_path / "data"
    if not root.exists():
        fixtures.write_imagefolder(root, classes=4, images_per_class=3)
    return ["train", "--dataset", "imagefolder", "--data-root", str(root), "--output-dir", str(out), *TINY_FLAGS]


class _Writes:
    """Unpickled, it calls ``call(*args)``: a file appears where a loader ran code."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _planted(kind: str, marker: pathlib.Path):
    if kind == "os.system":
        return _Writes(os.system, (f"touch {marker}",))
    if kind == "Path.write_text":
        return _Writes(pathlib.Path.write_text, (marker, "ran"))
    return _Writes(open, (str(marker), "w"))


def _plant_checkpoint(path: pathlib.Path, kind: str, marker: pathlib.Path) -> pathlib.Path:
    """A file with every key of a real checkpoint whose unpickling would create ``marker``."""
    state = {key: None for key in checkpoint.CHECKPOINT_KEYS}
    state.update(config={"dataset": "collage", "pooling": "gsp", "arch": "smallcnn", "embedding_dim": 8, "epochs": 1},
                 objective={"payload": _planted(kind, marker)}, history=[], rng=[])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


PLANTED = ["os.system", "Path.write_text", "open"]


@pytest.mark.parametrize("kind", PLANTED)
def test_a_planted_checkpoint_would_run_code_if_loaded_unsafely(kind, tmp_path):
    """The test files below are real: torch.load(weights_only=False) runs their payload."""
    marker = tmp_path / "MARKER"
    path = _plant_checkpoint(tmp_path / "checkpoint.pt", kind, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", PLANTED)
def test_evaluate_and_resume_refuse_a_checkpoint_that_runs_code(kind, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    planted = _plant_checkpoint(tmp_path / "run" / "checkpoint.pt", kind, marker)
    message = _fails(["evaluate", "--checkpoint", str(planted)], capsys)
    assert f"refused to load {planted}" in message and "weights_only=True" in message and "would call code" in message
    assert not marker.exists()
    message = _fails([*_train_flags(tmp_path, tmp_path / "run"), "--resume"], capsys)
    assert f"refused to load {planted}" in message and not marker.exists()
    message = _fails(["evaluate", "--checkpoint", str(tmp_path / "run")], capsys)  # the folder stands for its checkpoint
    assert "refused to load" in message and not marker.exists()


@pytest.mark.parametrize("kind", PLANTED)
def test_python_loaders_refuse_a_checkpoint_that_runs_code(kind, tmp_path):
    from gsp_kernels.nn.pretrained import load_backbone_weights, read_state_dict
    from gsp_kernels.training.models import build_model

    marker = tmp_path / "MARKER"
    planted = _plant_checkpoint(tmp_path / "run" / "checkpoint.pt", kind, marker)
    with pytest.raises(RunError, match="refused to load"):
        checkpoint.load_checkpoint(planted)
    with pytest.raises(RunError, match="refused to load"):
        evaluate_checkpoints([planted])
    with pytest.raises(RunError, match="refused to load"):  # resume, through train and fit
        train(TrainConfig(**TINY, output_dir=str(tmp_path / "run"), resume=True))
    with pytest.raises(ValueError, match="would call code"):
        read_state_dict(planted)
    with pytest.raises(ValueError, match="would call code"):
        load_backbone_weights(torch.nn.Linear(2, 2), planted)
    with pytest.raises(ValueError, match="would call code"):
        build_model("resnet18", pretrained=planted)
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    result = train(TrainConfig(**TINY, output_dir=str(tmp_path)))
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)  # no allowed globals at all
    assert list(state) == list(checkpoint.CHECKPOINT_KEYS)  # the keys as they were
    numpy_state = state["rng"][0]["numpy"]
    assert numpy_state["keys"].dtype == torch.int64 and numpy_state["keys"].shape == (624,)
    assert isinstance(state["rng"][0]["python"], tuple) and state["config"]["data_root"] is None
    assert len(state["history"]) == len(result["epochs"])


def test_rng_states_come_back_exactly_from_a_checkpoint_file(tmp_path):
    checkpoint.seed_everything(3)
    np.random.normal(size=3)  # a cached Gaussian in NumPy's state
    random.gauss(0, 1)
    torch.rand(5)
    saved = checkpoint.rng_state()
    expected = (torch.rand(4), np.random.normal(size=4), np.random.randint(0, 2**31, 4), [random.random() for _ in range(4)],
                random.gauss(0, 1))
    checkpoint.save_checkpoint(tmp_path / "rng.pt", {**{key: None for key in checkpoint.CHECKPOINT_KEYS}, "rng": [saved],
                                                     "config": {key: 1 for key in ("dataset", "pooling", "arch", "embedding_dim", "epochs")}})
    checkpoint.seed_everything(99)
    checkpoint.set_rng_state(checkpoint.load_checkpoint(tmp_path / "rng.pt")["rng"][0])
    again = (torch.rand(4), np.random.normal(size=4), np.random.randint(0, 2**31, 4), [random.random() for _ in range(4)],
             random.gauss(0, 1))
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and np.array_equal(again[2], expected[2])
    assert again[3:] == expected[3:]


def _as_written_before(path: pathlib.Path) -> None:
    """Rewrite a checkpoint as the earlier code wrote it: NumPy's state as np.random.get_state()."""
    state = torch.load(path, weights_only=True)
    for rank_state in state["rng"]:
        numpy_state = rank_state["numpy"]
        rank_state["numpy"] = (numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                               numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    torch.save(state, path)


def test_a_checkpoint_of_the_earlier_format_loads_and_resumes_exactly(tmp_path, monkeypatch):
    from test_train_loop import _interrupted, losses_of

    settings = {**TINY, "epochs": 3}
    straight = train(TrainConfig(**settings))
    _interrupted(TrainConfig(**settings, output_dir=str(tmp_path)), monkeypatch, after_saves=1)
    _as_written_before(tmp_path / checkpoint.CHECKPOINT_NAME)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert unsafe and all(name.startswith("numpy.") for name in unsafe)  # NumPy arrays, allowed as exactly that
    resumed = train(TrainConfig(**settings, output_dir=str(tmp_path), resume=True))
    assert losses_of(resumed["epochs"]) == losses_of(straight["epochs"]) and resumed["metrics"] == straight["metrics"]


def test_a_rerun_into_a_folder_holding_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_flags(tmp_path, out)) == 0
    capsys.readouterr()
    saved, results = (out / "checkpoint.pt").read_bytes(), (out / "results.json").read_bytes()
    message = _fails([*_train_flags(tmp_path, out), "--lr", "0.01"], capsys)
    assert str(out) in message and "--resume" in message and "--overwrite" in message
    assert (out / "checkpoint.pt").read_bytes() == saved and (out / "results.json").read_bytes() == results  # nothing lost
    # an mlrc run's fold checkpoints are a run too; a stray folder is not
    mlrc = tmp_path / "mlrc"
    (mlrc / "fold_old").mkdir(parents=True)
    (mlrc / "fold_old" / "checkpoint.pt").write_bytes(saved)
    assert cli.main([*_train_flags(tmp_path, mlrc)]) == 0
    (mlrc / "checkpoint.pt").unlink()
    (mlrc / "fold2").mkdir()
    (mlrc / "fold2" / "checkpoint.pt").write_bytes(saved)
    capsys.readouterr()
    message = _fails([*_train_flags(tmp_path, mlrc), "--protocol", "mlrc", "--num-folds", "2"], capsys)
    assert "fold2/checkpoint.pt" in message and "--resume" in message
    # with --overwrite it trains anew: the old checkpoints go, the new one is there
    assert cli.main([*_train_flags(tmp_path, out), "--lr", "0.01", "--overwrite"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["lr"] == 0.01
    assert cli.main([*_train_flags(tmp_path, mlrc), "--overwrite", "--seed", "1"]) == 0
    assert not (mlrc / "fold2" / "checkpoint.pt").exists() and (mlrc / "fold_old" / "checkpoint.pt").exists()


def test_resume_into_a_folder_of_another_protocol_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_flags(tmp_path, out)) == 0
    capsys.readouterr()
    message = _fails([*_train_flags(tmp_path, out), "--protocol", "mlrc", "--num-folds", "2", "--resume"], capsys)
    assert f"cannot resume {out / 'checkpoint.pt'}" in message and "fold1/checkpoint.pt" in message and "--overwrite" in message


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_unwritable_output_folder_is_found_before_any_data_is_read(command, tmp_path, monkeypatch, capsys):
    from gsp_kernels.training import evaluate

    def no_data(config):
        raise AssertionError("data read before the output folder was checked")

    monkeypatch.setattr(run, "load_data", no_data)
    monkeypatch.setattr(evaluate, "load_data", no_data)
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    out = blocker / "run"
    if command == "train":
        message = _fails(_train_flags(tmp_path, out), capsys)
    else:
        trained = _plant_checkpoint(tmp_path / "x" / "checkpoint.pt", "open", tmp_path / "MARKER")
        message = _fails(["evaluate", "--checkpoint", str(trained), "--output-dir", str(out)], capsys)
    assert f"cannot write to {'the output folder ' if command == 'train' else ''}{out}" in message and "--output-dir" in message
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_nothing_partial(error, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(state, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 1:
            return real_save(state, path, *args, **kwargs)
        pathlib.Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")  # what a full disk leaves
        raise error

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    message = _fails([*_train_flags(tmp_path, out), "--epochs", "3", "--scheduler", "constant"], capsys)
    assert f"cannot write the checkpoint to {out}" in message and "disk full" in message
    assert f"the previous checkpoint {out / 'checkpoint.pt'} is intact" in message
    assert checkpoint.load_checkpoint(out / "checkpoint.pt")["epoch"] == 0  # the first epoch's
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.pt", "config.yaml"]  # no .partial, no results.json
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main([*_train_flags(tmp_path, out), "--epochs", "3", "--scheduler", "constant", "--resume"]) == 0  # it goes on


def test_results_files_are_written_atomically(tmp_path, monkeypatch, capsys):
    replaced = []
    real_replace = os.replace

    def spy(source, target):
        replaced.append((pathlib.Path(source).name, pathlib.Path(target).name))
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", spy)
    out = tmp_path / "run"
    assert cli.main(_train_flags(tmp_path, out)) == 0
    assert cli.main(["evaluate", "--checkpoint", str(out), "--output-dir", str(tmp_path / "eval")]) == 0
    assert ("results.json.partial", "results.json") in replaced and ("evaluation.json.partial", "evaluation.json") in replaced
    assert ("checkpoint.pt.partial", "checkpoint.pt") in replaced and ("config.yaml.partial", "config.yaml") in replaced
    capsys.readouterr()
    # a write that fails leaves the previous file and no partial one
    previous = (out / "results.json").read_text()

    def full_disk(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError):
        files.write_json(out / "results.json", {"metrics": 1})
    assert (out / "results.json").read_text() == previous and not list(out.glob("*.partial"))
    monkeypatch.undo()
    json.loads(previous)


def test_a_figure_is_written_whole(tmp_path):
    pytest.importorskip("matplotlib")
    from gsp_kernels.training.datasets.collage import CollageDataset
    from gsp_kernels.training.demo import save_weight_figure

    dataset = CollageDataset("test", 1)
    save_weight_figure(str(tmp_path / "maps.png"), dataset, torch.full((len(dataset), 8, 8), 1 / 64))
    assert (tmp_path / "maps.png").read_bytes()[:4] == b"\x89PNG" and [path.name for path in tmp_path.iterdir()] == ["maps.png"]
