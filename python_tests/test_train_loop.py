"""The training loop's machinery: resume that matches an uninterrupted run (collage, images
with random augmentation, the plateau schedule, mlrc folds, DataLoader workers), early stopping, frozen
BatchNorm, class-disjoint ranks in the sampler, one progress line per epoch in a log,
channels-last and torch.compile."""

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")

import dataset_fixtures as fixtures

from gsp_kernels.training import embeddings, loop
from gsp_kernels.training.checkpoint import seed_everything
from gsp_kernels.training.config import TrainConfig
from gsp_kernels.training.datasets.collage import CollageDataset
from gsp_kernels.training.loop import fit
from gsp_kernels.training.models import build_model_for
from gsp_kernels.training.run import train
from gsp_kernels.training.samplers import ClassBalancedBatchSampler

pytestmark = pytest.mark.usefixtures("single_thread")


TINY = {"epochs": 2, "width": 8, "embedding_dim": 16, "num_prototypes": 8, "class_embedding_dim": 8, "collages_per_digit": 1,
        "batch_size": 40, "steps_per_epoch": 3, "progress": False}


def losses_of(history: list[dict]) -> list[tuple]:
    """The deterministic part of per-epoch records (not their timings)."""
    return [(epoch["loss"], epoch["metric"], epoch["zero_shot"], epoch["lr"], epoch.get("val_map_at_r")) for epoch in history]


def _interrupted(config: TrainConfig, monkeypatch, after_saves: int) -> None:
    """Run ``config`` until its ``after_saves``-th checkpoint is written, then kill it."""
    original, saves = loop.save_checkpoint, []

    def save_then_die(path, state):
        original(path, state)
        saves.append(path)
        if len(saves) == after_saves:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(config)


def _image_config(tmp_path) -> dict:
    root = fixtures.write_imagefolder(tmp_path / "data", classes=8, images_per_class=3)
    return {**TINY, "dataset": "imagefolder", "data_root": str(root), "image_size": 16, "batch_size": 6, "samples_per_class": 3,
            "eval_batch_size": 5}


@pytest.mark.parametrize("case", ["collage-cosine", "images-plateau-frozen-bn", "collage-mlrc", "collage-prototype-memory"])
def test_resume_matches_an_uninterrupted_run(case, tmp_path, monkeypatch):
    if case == "collage-cosine":
        settings, after_saves = {**TINY, "epochs": 3}, 1
    elif case == "images-plateau-frozen-bn":  # random-resized crops: the RNG state must come back
        settings = {**_image_config(tmp_path), "epochs": 4, "optimizer": "adam", "lr": 0.05, "scheduler": "plateau",
                    "plateau_patience": 0, "grad_clip": 1.0, "freeze_bn": True}
        after_saves = 2
    elif case == "collage-mlrc":  # killed in the second fold's first epoch
        settings, after_saves = {**TINY, "protocol": "mlrc", "num_folds": 2, "early_stopping_patience": 5}, 3
    else:  # killed with the prototype memory part-filled (120 of 200 pooled embeddings)
        settings, after_saves = {**TINY, "epochs": 3, "prototype_init": "memory", "prototype_memory": 200}, 1
    straight = train(TrainConfig(**settings, output_dir=str(tmp_path / "straight")))
    _interrupted(TrainConfig(**settings, output_dir=str(tmp_path / "resumed")), monkeypatch, after_saves)
    resumed = train(TrainConfig(**settings, output_dir=str(tmp_path / "resumed"), resume=True))
    assert resumed["metrics"] == straight["metrics"]
    if case == "collage-mlrc":
        assert [losses_of(fold["epochs"]) for fold in resumed["folds"]] == [losses_of(fold["epochs"]) for fold in straight["folds"]]
        models = zip(resumed["models"], straight["models"])
    else:
        assert losses_of(resumed["epochs"]) == losses_of(straight["epochs"])
        models = [(resumed["model"], straight["model"])]
        if case == "images-plateau-frozen-bn":
            assert straight["epochs"][-1]["lr"] < settings["lr"]  # the plateau acted
    for resumed_model, straight_model in models:  # bitwise: the same operations on the same CPU
        for (name, value), other in zip(resumed_model.state_dict().items(), straight_model.state_dict().values()):
            assert torch.equal(value, other), name


def test_dataloader_workers_change_nothing(tmp_path, monkeypatch):
    """Each sample's crop is seeded by (seed, epoch, step, position): two persistent workers
    train exactly as the main process does, and so does a run resumed with workers."""
    settings = {**_image_config(tmp_path), "epochs": 3}
    in_process = train(TrainConfig(**settings))
    _interrupted(TrainConfig(**settings, num_workers=2, output_dir=str(tmp_path / "run")), monkeypatch, after_saves=1)
    workers = train(TrainConfig(**settings, num_workers=2, output_dir=str(tmp_path / "run"), resume=True))
    assert losses_of(workers["epochs"]) == losses_of(in_process["epochs"]) and workers["metrics"] == in_process["metrics"]
    reseeded = train(TrainConfig(**{**settings, "seed": 1}))
    assert losses_of(reseeded["epochs"]) != losses_of(in_process["epochs"])


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    config = TrainConfig(**TINY, output_dir=str(tmp_path))
    first = train(config)
    again = train(TrainConfig(**TINY, output_dir=str(tmp_path), resume=True))
    assert losses_of(again["epochs"]) == losses_of(first["epochs"]) and again["metrics"] == first["metrics"]
    with pytest.raises(ValueError, match=r"cannot resume .* lr 0.001 -> 0.01, seed 0 -> 1"):
        train(TrainConfig(**TINY, output_dir=str(tmp_path), resume=True, lr=0.01, seed=1))
    # the cosine schedule ends at the epochs it was built for: more would anneal back up
    assert config.scheduler == "cosine"
    with pytest.raises(ValueError, match=r"cannot resume .* epochs 2 -> 3"):
        train(TrainConfig(**{**TINY, "epochs": 3}, output_dir=str(tmp_path), resume=True))


def test_early_stopping_keeps_the_best_epoch():
    scores = iter([0.2, 0.5, 0.4, 0.3, 0.9])
    snapshots = []

    def validate(model):
        snapshots.append({name: value.clone() for name, value in model.state_dict().items()})
        return next(scores)

    config = TrainConfig(**{**TINY, "epochs": 5, "early_stopping_patience": 2})
    run = fit(config, CollageDataset("train", 1), torch.device("cpu"), validate=validate)
    assert len(run["history"]) == 4 and run["best_epoch"] == 2 and run["best_score"] == 0.5  # 0.4, 0.3: two worse epochs
    assert [epoch["val_map_at_r"] for epoch in run["history"]] == [0.2, 0.5, 0.4, 0.3]
    final = run["model"].state_dict()
    assert all(torch.equal(value, snapshots[1][name]) for name, value in final.items())
    assert not all(torch.equal(value, snapshots[3][name]) for name, value in final.items())


def _batchnorm_state(model) -> dict:
    return {name: value for name, value in model.trunk.state_dict().items() if name.split(".")[-1] in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked") and _is_batchnorm(model.trunk, name)}


def _is_batchnorm(trunk, name: str) -> bool:
    return isinstance(trunk.get_submodule(name.rsplit(".", 1)[0]), torch.nn.BatchNorm2d)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_frozen_batchnorm(freeze_bn):
    config = TrainConfig(**TINY, freeze_bn=freeze_bn, pooling="gap")
    seed_everything(config.seed)
    initial = build_model_for(config)
    trained = train(config)["model"]
    before, after = _batchnorm_state(initial), _batchnorm_state(trained)
    assert len(before) == 4 * 5  # four BatchNorm2d layers in the SmallCNN
    unchanged = all(torch.equal(after[name], before[name]) for name in before)
    assert unchanged == freeze_bn
    assert not torch.equal(trained.trunk[0].weight, initial.trunk[0].weight)  # the convolutions do train


def test_sampler_gives_each_rank_disjoint_classes_per_step():
    labels = torch.arange(12).repeat_interleave(5)  # 12 classes x 5
    ranks = [ClassBalancedBatchSampler(labels, 8, 4, seed=1, rank=rank, world_size=3) for rank in range(3)]
    assert len(ranks[0]) == 60 // (8 * 3)
    for batches in zip(*(list(sampler) for sampler in ranks)):
        class_sets = [set(labels[batch].tolist()) for batch in batches]
        assert [len(classes) for classes in class_sets] == [2, 2, 2] and all(len(batch) == 8 for batch in batches)
        assert len(set().union(*class_sets)) == 6
    assert len(list(ClassBalancedBatchSampler(labels, 8, 4, num_batches=7))) == 7
    with pytest.raises(ValueError, match="at least 2 classes per rank"):
        ClassBalancedBatchSampler(torch.tensor([0, 0, 1, 1, 2, 2]), 4, 2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler(labels, 8, 4, rank=3, world_size=3)


def test_progress_writes_one_line_per_epoch_to_a_log(capsys):
    train(TrainConfig(**{**TINY, "progress": True}))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    for epoch, line in enumerate(lines, start=1):
        assert line.startswith(f"gsp epoch {epoch}/2: loss ") and "images/s" in line


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    import sys

    from tqdm.auto import tqdm

    items = [1, 2, 3]
    assert loop._progress(items, "x", True) is items  # pytest's stderr is no terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = loop._progress(items, "x", True)
    assert isinstance(bar, tqdm) and list(bar) == items
    assert loop._progress(items, "x", False) is items
    capsys.readouterr()
    train(TrainConfig(**{**TINY, "epochs": 1, "progress": True}))
    shown = capsys.readouterr().err
    assert "\r" in shown and "images_per_s=" in shown and "gsp epoch 1/1: loss " in shown  # the bar, then the epoch's line


def test_channels_last_trains_like_the_default_layout():
    default = train(TrainConfig(**TINY))
    channels_last = train(TrainConfig(**TINY, channels_last=True))
    conv = channels_last["model"].trunk[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for ours, theirs in zip(losses_of(channels_last["epochs"]), losses_of(default["epochs"])):
        torch.testing.assert_close(ours[:3], theirs[:3], rtol=1e-4, atol=1e-5)  # other convolution kernels


def test_compile_runs_a_training_step():
    settings = {**TINY, "epochs": 1, "steps_per_epoch": 2, "width": 4, "backend": "reference"}  # GSP's custom op compiled too
    eager = train(TrainConfig(**settings))
    compiled = train(TrainConfig(**settings, compile=True))
    assert hasattr(compiled["model"], "_compiled_call_impl") and compiled["model"]._compiled_call_impl is not None
    torch.testing.assert_close(losses_of(compiled["epochs"])[0][:3], losses_of(eager["epochs"])[0][:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled["map_at_r"], eager["map_at_r"], rtol=1e-3, atol=1e-3)


def _torchrun_rank(rank: int, world_size: int, port: int, body, settings: dict, out: str) -> None:
    """One torchrun-style rank: env:// rendezvous as torchrun sets it up, then ``body(rank,
    settings, out)``, whose ``train`` joins the group."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        body(rank, settings, out)  # its runs (and their DDP reducers) released before the group goes
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn_two_torchrun_ranks(body, settings: dict, out) -> None:
    """``body`` on two CPU ranks (gloo) that rendezvous on a free local port."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_torchrun_rank, args=(2, port, body, settings, str(out)), nprocs=2, join=True)


def _ddp_runs(rank: int, settings: dict, out: str) -> None:
    """One rank: a standard run with the plateau schedule and an mlrc run."""
    standard = train(TrainConfig(**{**settings, "scheduler": "plateau", "plateau_patience": 0, "lr": 1e-5, "epochs": 4},
                                 output_dir=f"{out}/standard"))
    mlrc = train(TrainConfig(**{**settings, "protocol": "mlrc", "num_folds": 2, "early_stopping_patience": 1, "epochs": 3}))
    summary = {"metrics": standard["metrics"], "losses": losses_of(standard["epochs"]), "mlrc_metrics": mlrc["metrics"],
               "mlrc_epochs": [len(fold["epochs"]) for fold in mlrc["folds"]]}
    torch.save(summary, f"{out}/rank{rank}.pt")


def _ddp_resume_runs(rank: int, settings: dict, out: str) -> None:
    """One rank: a 4-epoch run, and a 2-epoch run extended to 4 from its checkpoint."""
    straight = train(TrainConfig(**{**settings, "epochs": 4}))
    train(TrainConfig(**settings, output_dir=f"{out}/run"))
    extended = train(TrainConfig(**{**settings, "epochs": 4}, output_dir=f"{out}/run", resume=True))
    summary = {"straight": losses_of(straight["epochs"]), "extended": losses_of(extended["epochs"]),
               "straight_metrics": straight["metrics"], "extended_metrics": extended["metrics"],
               "weights_equal": all(torch.equal(a, b) for a, b in zip(straight["model"].state_dict().values(),
                                                                      extended["model"].state_dict().values()))}
    torch.save(summary, f"{out}/resume_rank{rank}.pt")


def test_resume_under_two_ranks_matches_the_uninterrupted_run(tmp_path):
    root = fixtures.write_imagefolder(tmp_path / "data", classes=16, images_per_class=3)
    settings = {**TINY, "dataset": "imagefolder", "data_root": str(root), "image_size": 16, "batch_size": 4, "samples_per_class": 2,
                "eval_batch_size": 7, "scheduler": "plateau", "plateau_patience": 0, "lr": 1e-3}
    _spawn_two_torchrun_ranks(_ddp_resume_runs, settings, tmp_path)
    for rank in range(2):
        summary = torch.load(tmp_path / f"resume_rank{rank}.pt", weights_only=False)
        assert summary["extended"] == summary["straight"] and summary["weights_equal"], rank  # bitwise, on every rank
        assert summary["extended_metrics"] == summary["straight_metrics"]  # rank 0's metrics, None on rank 1
    assert torch.load(tmp_path / "resume_rank0.pt", weights_only=False)["straight_metrics"] is not None


def test_training_under_two_ranks(tmp_path):
    root = fixtures.write_imagefolder(tmp_path / "data", classes=16, images_per_class=3)  # 8 training classes
    settings = {**TINY, "dataset": "imagefolder", "data_root": str(root), "image_size": 16, "batch_size": 4, "samples_per_class": 2,
                "eval_batch_size": 7}
    _spawn_two_torchrun_ranks(_ddp_runs, settings, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2))
    assert rank0["metrics"] is not None and rank1["metrics"] is None  # rank 0 evaluates
    assert rank0["mlrc_metrics"] is not None and rank1["mlrc_metrics"] is None
    assert rank0["mlrc_epochs"] == rank1["mlrc_epochs"]  # the early-stopping decision is rank 0's on both
    assert rank0["losses"] == rank1["losses"]  # the mean over both ranks: one plateau decision
    assert len({epoch[3] for epoch in rank0["losses"]}) > 1  # the plateau schedule acted
    checkpoint = torch.load(tmp_path / "standard" / "checkpoint.pt", weights_only=False)
    assert len(checkpoint["rng"]) == 2  # every rank's RNG states, to resume each rank's augmentation


def test_loader_options():
    cpu = loop._loader_options(TrainConfig(num_workers=0), torch.device("cpu"))
    assert cpu == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    cuda = loop._loader_options(TrainConfig(num_workers=3), torch.device("cuda", 0))
    assert cuda == {"num_workers": 3, "pin_memory": True, "persistent_workers": True}


def test_bf16_autocast_trains_close_to_float32():
    full = train(TrainConfig(**TINY))
    half = train(TrainConfig(**TINY, amp=True))
    for ours, theirs in zip(losses_of(half["epochs"]), losses_of(full["epochs"])):
        torch.testing.assert_close(ours[:3], theirs[:3], rtol=0.05, atol=0.05)  # bf16 keeps 8 bits of mantissa
    assert half["metrics"]["map@r"] > 0


def test_summary_shows_the_last_epochs():
    from gsp_kernels.training.report import SUMMARY_EPOCHS, summary_table

    epoch = {"loss": 1.0, "metric": 0.5, "zero_shot": 0.5, "lr": 1e-5, "images_per_second": 10.0}
    result = {"config": TrainConfig(), "epochs": [epoch] * (SUMMARY_EPOCHS + 3), "metrics": None}
    lines = summary_table(result).splitlines()
    assert lines[0].startswith("collage: GSP (16 prototypes")  # the title line
    assert lines[3].startswith("4 ") and lines[-2].startswith(f"{SUMMARY_EPOCHS + 3} ") and lines[-1] == "(3 earlier epochs in results.json)"
    assert len(summary_table({**result, "epochs": [epoch] * 2}).splitlines()) == 5


def test_extending_a_plateau_run_matches_the_longer_run(tmp_path):
    # a learning rate too small to lower the loss: the plateau schedule halves it after epochs 2 and 3
    settings = {**TINY, "scheduler": "plateau", "plateau_patience": 0, "optimizer": "adam", "lr": 1e-7, "min_lr": 1e-9}
    longer = train(TrainConfig(**{**settings, "epochs": 4}))
    train(TrainConfig(**settings, output_dir=str(tmp_path)))  # 2 epochs, then 2 more
    extended = train(TrainConfig(**{**settings, "epochs": 4}, output_dir=str(tmp_path), resume=True))
    assert losses_of(extended["epochs"]) == losses_of(longer["epochs"]) and extended["metrics"] == longer["metrics"]
    assert [epoch["lr"] for epoch in longer["epochs"]] == [1e-7, 1e-7, 5e-8, 2.5e-8]  # the plateau state came back with the checkpoint


def test_the_test_split_is_embedded_only_after_training(monkeypatch):
    """The plateau schedule (and the recipes' whole run) never sees the test classes: the test
    split is embedded once, after the last epoch."""
    events = []
    original_epoch, original_embed = loop._train_epoch, embeddings.compute_embeddings

    def epoch(*args, **kwargs):
        events.append("epoch")
        return original_epoch(*args, **kwargs)

    def embed(model, dataset, *args, **kwargs):
        events.append(("embed", dataset.digits.min().item()))
        return original_embed(model, dataset, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", epoch)
    monkeypatch.setattr(embeddings, "compute_embeddings", embed)
    train(TrainConfig(**{**TINY, "epochs": 3, "scheduler": "plateau"}))
    assert events == ["epoch", "epoch", "epoch", ("embed", 5)]  # the test digits 5-9, once, at the end
