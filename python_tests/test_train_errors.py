"""A user's mistake in `gsp-kernels train`, `evaluate` or `demo` is one line on stderr with exit
status 2 that says what to change (never a traceback), found before any data is read where it
can be; and the labels of a run tell the truth (a GSP model still in its GAP warm-up, a recipe
the data did not allow)."""

import json
import sys

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("torchvision")

import dataset_fixtures as fixtures
from test_train_files import TINY, TINY_FLAGS, _fails, _train_flags

from gsp_kernels import cli
from gsp_kernels.training import evaluate, loop, run
from gsp_kernels.training.config import TrainConfig
from gsp_kernels.training.report import summary_table
from gsp_kernels.training.run import train

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a command reads its data (the mistake must be found before)."""

    def refuse(config):
        raise AssertionError("data read before the mistake was found")

    monkeypatch.setattr(run, "load_data", refuse)
    monkeypatch.setattr(evaluate, "load_data", refuse)


def test_too_many_prototypes_for_the_first_batch_names_the_flags(tmp_path, capsys):
    # the first small run most users try: a ResNet's 1x1 map at 32 px, 32 images, the default 64 prototypes
    root = fixtures.write_imagefolder(tmp_path / "data", classes=8, images_per_class=3)
    message = _fails(["train", "--dataset", "imagefolder", "--data-root", str(root), "--arch", "resnet18", "--image-size", "32",
                      "--batch-size", "32", "--epochs", "1", "--steps-per-epoch", "1", "--no-progress"], capsys)
    assert "--num-prototypes 64" in message and "has 32 (32 images x a 1x1 feature map at --image-size 32)" in message
    assert "--batch-size" in message and "--image-size" in message and "32 or less" in message


def test_too_many_prototypes_for_the_class_proxies(capsys):
    message = _fails(["train", "--prototype-init", "proxies", "--metric-loss", "proxyanchor", "--num-prototypes", "30",
                      "--epochs", "1", "--steps-per-epoch", "1", "--width", "4", "--no-progress"], capsys)
    assert "--num-prototypes 30" in message and "5 classes" in message and "5 or less" in message


def test_a_bad_pretrained_file_before_any_data_is_read(tmp_path, capsys, no_data):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    flags = ["train", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--arch", "resnet18", "--no-progress"]
    message = _fails([*flags, "--pretrained", str(text)], capsys)
    assert f"--pretrained {text}" in message and "another format, or a damaged file" in message
    message = _fails([*flags, "--pretrained", str(other)], capsys)
    assert f"--pretrained {other}" in message and "matches none of the" in message


def test_resuming_with_a_changed_flag_says_which_and_keeps_the_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(_train_flags(tmp_path, out)) == 0
    capsys.readouterr()
    saved = (out / "checkpoint.pt").read_bytes()

    def refuse(config):
        raise AssertionError("data read before the mistake was found")

    monkeypatch.setattr(run, "load_data", refuse)
    message = _fails([*_train_flags(tmp_path, out), "--resume", "--lr", "0.01", "--freeze-bn"], capsys)
    assert "lr 0.001 -> 0.01, freeze_bn False -> True" in message and "--lr 0.001 --no-freeze-bn" in message
    assert "--overwrite" in message and (out / "checkpoint.pt").read_bytes() == saved


def test_a_file_that_is_no_checkpoint_given_to_evaluate(tmp_path, capsys):
    state_dict = tmp_path / "resnet.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state_dict)
    message = _fails(["evaluate", "--checkpoint", str(state_dict)], capsys)
    assert f"{state_dict} is not a checkpoint written by gsp-kernels train" in message and "--pretrained" in message
    garbage = tmp_path / "notes.pt"
    garbage.write_text("hello")
    message = _fails(["evaluate", "--checkpoint", str(garbage)], capsys)
    assert f"refused to load {garbage}" in message and "another format, or a damaged file" in message
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "refused to load" in _fails(["evaluate", "--checkpoint", str(empty)], capsys)


def test_a_foreign_checkpoint_on_resume(tmp_path, capsys, no_data):
    out = tmp_path / "run"
    out.mkdir()
    from gsp_kernels.training.checkpoint import CHECKPOINT_KEYS

    torch.save({**{key: {} for key in CHECKPOINT_KEYS}, "config": {"lr": 0.1}}, out / "checkpoint.pt")
    message = _fails([*_train_flags(tmp_path, out), "--resume"], capsys)
    assert "is not a checkpoint written by gsp-kernels train" in message and "config['epochs']" in message
    assert message.startswith("gsp-kernels train: error: cannot resume: ") and "--overwrite" in message


def test_evaluate_ignores_a_stray_fold_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_flags(tmp_path, out)) == 0
    mlrc = tmp_path / "mlrc"
    for name in ("fold1", "fold2", "fold_old", "fold10.bak"):
        (mlrc / name).mkdir(parents=True)
        (mlrc / name / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(mlrc), "--output-dir", str(tmp_path / "eval")]) == 0
    record = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert record["checkpoints"] == [str(mlrc / "fold1" / "checkpoint.pt"), str(mlrc / "fold2" / "checkpoint.pt")]


def test_evaluate_from_another_directory(tmp_path, capsys, monkeypatch):
    fixtures.write_imagefolder(tmp_path / "data", classes=4, images_per_class=3)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--dataset", "imagefolder", "--data-root", "data", "--output-dir", "run", *TINY_FLAGS]) == 0
    trained = json.loads((tmp_path / "run" / "results.json").read_text())
    assert trained["config"]["data_root"] == str(tmp_path / "data")  # stored absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--output-dir", "eval"]) == 0
    assert json.loads((elsewhere / "eval" / "evaluation.json").read_text())["metrics"] == trained["metrics"]
    # a checkpoint that stored its data root relative (earlier versions): the error says to pass --data-root
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["data_root"] = "data"
    torch.save(state, path)
    message = _fails(["evaluate", "--checkpoint", str(tmp_path / "run")], capsys)
    assert "data root 'data'" in message and "pass --data-root" in message
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data-root", str(tmp_path / "data")]) == 0
    # and resuming it from where it was trained still sees the same data root
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--dataset", "imagefolder", "--data-root", "data", "--output-dir", "run", *TINY_FLAGS, "--resume"]) == 0


@pytest.mark.parametrize("missing", ["sklearn", "pytorch_metric_learning"])
@pytest.mark.parametrize("command", ["train", "evaluate", "demo"])
def test_the_train_extra_missing_gives_the_install_hint(command, missing, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # import of it fails, as when it is not installed
    argv = {"train": ["train", "--no-progress"], "evaluate": ["evaluate", "--checkpoint", str(tmp_path)],
            "demo": ["demo", "--figure", ""]}[command]
    message = _fails(argv, capsys)
    assert f"needs {missing}" in message and 'pip install -e ".[train]"' in message
    if missing == "sklearn":
        assert "scikit-learn" in message


def test_a_module_missing_mid_run_gives_the_install_hint(capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(loop, "build_metric_loss", missing)
    message = _fails(["train", "--epochs", "1", "--width", "4", "--no-progress"], capsys)
    assert "needs scipy (scipy)" in message and 'pip install -e ".[train]"' in message


def test_a_torchvision_vit_at_another_image_size_before_any_data_is_read(tmp_path, capsys, no_data):
    message = _fails(["train", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--arch", "vit_b_16",
                      "--image-size", "64", "--no-progress"], capsys)
    assert "--arch vit_b_16 at --image-size 64" in message and "224" in message


@pytest.mark.parametrize(("flags", "expected"), [
    (["--device", "nonsense"], "--device 'nonsense' is no device torch knows"),
    (["--backend", "cuda", "--device", "cpu"], "--backend cuda does not run on cpu"),
    (["--resume"], "resume needs output_dir"),
    (["--overwrite"], "overwrite needs output_dir"),
    (["--resume", "--overwrite", "--output-dir", "x"], "choose one"),
])
def test_device_backend_and_output_flags(flags, expected, capsys, no_data):
    assert expected in _fails(["train", "--no-progress", *flags], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one(capsys, no_data):
    assert "no CUDA device here" in _fails(["train", "--device", "cuda", "--no-progress"], capsys)


def test_data_too_small_for_the_settings(tmp_path, capsys):
    flags = _train_flags(tmp_path, tmp_path / "run")  # 4 classes: 2 train
    message = _fails([*flags, "--protocol", "mlrc", "--num-folds", "3"], capsys)
    assert "--num-folds 3" in message and "has 2" in message
    message = _fails([*flags, "--overwrite", "--num-train-classes", "1"], capsys)
    assert "at least 2 classes per rank" in message and "--num-train-classes" in message


@pytest.mark.parametrize(("flags", "expected"), [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--threads", "-2"], "--threads must be >= 1"),
    (["--figure", "maps.bmp"], "matplotlib writes no '.bmp' files"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--device", "nonsense"], "--device 'nonsense' is no device torch knows"),
])
def test_demo_mistakes(flags, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expected in _fails(["demo", "--no-progress", *flags], capsys)


def test_demo_figure_in_an_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    message = _fails(["demo", "--figure", str(blocker / "maps.png")], capsys)
    assert f"cannot write to {blocker}" in message and "--figure" in message


# Labels tell the truth


def test_a_gsp_run_still_in_its_warm_up_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*_train_flags(tmp_path, out), "--prototype-init", "memory", "--prototype-memory", "64"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: the GSP prototypes never left their warm-up: the prototype memory held 8 of 64" in captured.err  # the log
    assert "gsp smallcnn 8-d (GAP warm-up)" in captured.out and "WARNING: the GSP prototypes never left" in captured.out
    record = json.loads((out / "results.json").read_text())
    assert record["warm_up"] == {"memory_filled": 8, "memory_size": 64} and "never left their warm-up" in record["warnings"][0]
    assert cli.main(["evaluate", "--checkpoint", str(out), "--output-dir", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    assert "(GAP warm-up)" in captured.out and "never left their warm-up" in captured.out
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["models"][0]["warm_up"] == {"memory_filled": 8, "memory_size": 64} and evaluation["warnings"]
    # once the memory fills, the run is GSP and says nothing
    assert cli.main([*_train_flags(tmp_path, out), "--prototype-init", "memory", "--prototype-memory", "8", "--overwrite"]) == 0
    captured = capsys.readouterr()
    record = json.loads((out / "results.json").read_text())
    assert record["warm_up"] is None and record["warnings"] == [] and "WARNING" not in captured.err
    assert "gsp smallcnn 8-d " in captured.out and "(GAP warm-up)" not in captured.out


def test_mlrc_folds_still_in_their_warm_up_say_so():
    result = train(TrainConfig(**TINY, protocol="mlrc", num_folds=2, prototype_init="memory", prototype_memory=500,
                               early_stopping_patience=5))
    assert [record["warm_up"]["memory_size"] for record in result["folds"]] == [500, 500]
    assert [text[:7] for text in result["warnings"]] == ["fold 1:", "fold 2:"]
    table = summary_table(result)
    assert "fold 1 (8-d) (GAP warm-up)" in table and "WARNING: fold 2: the GSP prototypes never left" in table


def test_a_recipe_the_data_does_not_allow_says_which_part(tmp_path, capsys):
    root = fixtures.write_cub(tmp_path / "data")  # 3 training classes of 3 images
    out = tmp_path / "run"
    assert cli.main(["train", "--recipe", "cub", "--data-root", str(root), "--output-dir", str(out), *TINY_FLAGS,
                     "--batch-size", "16", "--samples-per-class", "4"]) == 0
    captured = capsys.readouterr()
    record = json.loads((out / "results.json").read_text())
    not_followed = record["recipe_not_followed"]
    assert len(not_followed) == 3
    assert "k-center over a memory of 1024 pooled embeddings: it held" in not_followed[0]
    assert "batches of 4 classes x 4 images: the training set has 3 classes, so a batch held 3 classes x 5 images" == not_followed[1]
    assert "3 of the 3 training classes have fewer, drawn with repetition" in not_followed[2]
    for text in not_followed:
        assert f"WARNING: recipe cub not followed on this data: {text}" in captured.err  # the log
        assert f"WARNING: recipe cub not followed on this data: {text}" in captured.out  # the table
    assert "(GAP warm-up)" in captured.out
    # a recipe the data allows lists nothing
    small = fixtures.write_cub(tmp_path / "small", class_ids=(1, 2, 3, 4, 101, 102))
    assert cli.main(["train", "--recipe", "cub", "--data-root", str(small), "--output-dir", str(tmp_path / "ok"), *TINY_FLAGS,
                     "--prototype-memory", "8", "--epochs", "2"]) == 0
    record = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert record["recipe_not_followed"] == [] and record["warnings"] == [] and "recipe_not_reproduced" in record


def test_more_training_classes_than_the_imagefolder_has(tmp_path, capsys):
    root = fixtures.write_imagefolder(tmp_path / "data", classes=8, images_per_class=2)
    message = _fails(["train", "--dataset", "imagefolder", "--data-root", str(root), "--num-train-classes", "20",
                      *TINY_FLAGS], capsys)
    assert "--num-train-classes 20" in message and "found 8 class folder(s)" in message and "between 1 and 7" in message
