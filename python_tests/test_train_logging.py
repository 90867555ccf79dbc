"""`--log tensorboard`: event files under the run folder (an mlrc fold's under fold<k>/), read back
with TensorBoard's EventAccumulator: the losses, learning rate and images/s of every step and
epoch as results.json records them, validation and test metrics, the spread of the GSP weights
and a figure of weight maps per epoch."""

import json
import math

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gsp_kernels import cli
from gsp_kernels.training.tensorboard_log import top_share

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "20", "--collages-per-digit", "1", "--width", "4",
        "--embedding-dim", "8", "--num-prototypes", "4", "--class-embedding-dim", "4", "--no-progress"]


def _events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_a_gsp_run_logs_losses_rates_metrics_and_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--output-dir", str(out), "--log", "tensorboard"]) == 0
    capsys.readouterr()
    record = json.loads((out / "results.json").read_text())
    events = _events(out / "tensorboard")
    tags = events.Tags()
    assert [step for step, _ in _scalars(events, "step/loss")] == [1, 2, 3, 4, 5, 6]
    for tag in ("step/metric_loss", "step/zero_shot_loss", "step/lr"):
        assert len(_scalars(events, tag)) == 6 and all(math.isfinite(value) for _, value in _scalars(events, tag))
    for key, tag in {"loss": "epoch/loss", "metric": "epoch/metric_loss", "zero_shot": "epoch/zero_shot_loss", "lr": "epoch/lr",
                     "images_per_second": "epoch/images_per_second"}.items():
        logged = _scalars(events, tag)
        assert [step for step, _ in logged] == [3, 6]
        assert [value for _, value in logged] == pytest.approx([epoch[key] for epoch in record["epochs"]], rel=1e-6, abs=1e-12)
    assert _scalars(events, "step/lr")[0][1] > _scalars(events, "step/lr")[-1][1]  # the cosine schedule
    shares = [value for _, value in _scalars(events, "weights/top30_share")]
    assert len(shares) == 2 and all(0.3 <= share <= 1.0 for share in shares)
    assert [event.step for event in events.Histograms("weights/pooling")] == [3, 6]
    maps = events.Images("weights/maps")
    assert [image.step for image in maps] == [3, 6] and maps[0].encoded_image_string[:4] == b"\x89PNG" and maps[0].width > 100
    test_metrics = {tag.removeprefix("test/"): _scalars(events, tag) for tag in tags["scalars"] if tag.startswith("test/")}
    assert set(test_metrics) == set(record["metrics"])
    assert all(logged == [(6, pytest.approx(record["metrics"][name], rel=1e-6))] for name, logged in test_metrics.items())


def test_a_gap_run_logs_no_weights_and_an_mlrc_run_logs_each_fold(tmp_path, capsys):
    gap = tmp_path / "gap"
    assert cli.main(["train", *TINY, "--pooling", "gap", "--output-dir", str(gap), "--log", "tensorboard"]) == 0
    tags = _events(gap / "tensorboard").Tags()
    assert "epoch/loss" in tags["scalars"] and not any(tag.startswith("weights/") for tag in tags["scalars"] + tags["images"])
    mlrc = tmp_path / "mlrc"
    assert cli.main(["train", *TINY, "--protocol", "mlrc", "--num-folds", "2", "--output-dir", str(mlrc), "--log", "tensorboard"]) == 0
    capsys.readouterr()
    record = json.loads((mlrc / "results.json").read_text())
    assert (mlrc / "config.yaml").is_file() and not (mlrc / "tensorboard").exists()
    for fold in record["folds"]:
        events = _events(mlrc / f"fold{fold['fold']}" / "tensorboard")
        validation = _scalars(events, "validation/map_at_r")
        assert [value for _, value in validation] == pytest.approx([epoch["val_map_at_r"] for epoch in fold["epochs"]], rel=1e-6)
        assert _scalars(events, "test/map@r")[0][1] == pytest.approx(fold["metrics"]["map@r"], rel=1e-6)


def test_a_resumed_run_continues_its_log(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--epochs", "1", "--scheduler", "constant", "--output-dir", str(out)]) == 0
    assert cli.main(["train", *TINY, "--scheduler", "constant", "--output-dir", str(out), "--resume", "--log", "tensorboard"]) == 0
    capsys.readouterr()
    events = _events(out / "tensorboard")
    assert [step for step, _ in _scalars(events, "step/loss")] == [4, 5, 6] and [step for step, _ in _scalars(events, "epoch/loss")] == [6]


def test_logging_needs_an_output_folder(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *TINY, "--log", "tensorboard"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == ("gsp-kernels train: error: --log tensorboard writes its files under the run's folder: "
                                                 "pass --output-dir")


def test_top_share():
    assert top_share(torch.full((2, 10), 0.1)) == pytest.approx(0.3)
    assert top_share(torch.eye(10)[:3]) == pytest.approx(1.0)
    assert top_share(torch.tensor([[0.1, 0.4, 0.2, 0.3]])) == pytest.approx(0.7)  # the top 2 of 4 positions: ceil(1.2)
