"""A training run: ``train(config)`` checks the settings, joins torchrun's process group,
picks the device, checks the output folder and the model before any data is read, seeds,
loads the data (``load_data``) and hands over to the protocol ``config.protocol`` names
(``protocols.py``). The settings (``TrainConfig``) live in ``config.py``, what a run prints
and writes in ``report.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import discard_run_checkpoints, prepare_output_dir, seed_everything
from .config import RunError, TrainConfig, eval_resize, validate_config
from .config_files import write_run_config
from .datasets import RECALL_KS, BenchmarkData, load_benchmark
from .datasets.collage import CollageDataset
from .distributed import check_device, init_distributed, resolve_device
from .models import check_model
from .protocols import train_mlrc, train_standard
from .transforms import test_transform, train_transform


def load_data(config: TrainConfig) -> BenchmarkData:
    """The train and test splits of ``config.dataset`` with the papers' transforms at
    ``config.image_size`` (test: shorter side ``config.resize``, centre crop)."""
    if config.dataset == "collage":
        return BenchmarkData(
            train=CollageDataset("train", config.collages_per_digit, seed=config.data_seed),
            query=CollageDataset("test", 1, seed=config.data_seed),
            gallery=None,
            recall_ks=RECALL_KS["collage"],
            name="collage",
        )
    return load_benchmark(
        config.dataset,
        config.data_root,
        train_transform=train_transform(config.image_size),
        test_transform=test_transform(eval_resize(config), config.image_size),
        num_train_classes=config.num_train_classes,
    )


def train(config: TrainConfig, *, config_format: str = "yaml") -> dict:
    """Train and evaluate as ``config.protocol`` says. Returns {"config", "splits" (classes
    and images per split), "split_differences" (from the papers' split sizes:
    ``BenchmarkData.differences_from_papers``), "epochs" (per-epoch records), "metrics" (test retrieval metrics),
    "recall_at_1", "map_at_r", "seconds", "images_per_second", "model", "warm_up", "pooling_values" (a GSP head's mu
    and gamma, learned or fixed, in the tested weights), "warnings"
    (and for a recipe "recipe_not_followed": ``protocols.run_notes``), "device" (the one used)};
    "mlrc" adds "folds" (``protocols.train_mlrc``). Metrics on rank 0; other ranks get None. The run's
    "config" holds ``data_root`` as an absolute path (so that ``evaluate`` finds the data
    from any directory).

    Before any data is read: the output folder must be writable and hold no run's checkpoint
    unless ``resume`` (checked to load and fit these settings) or ``overwrite``; the model is
    built once (``models.check_model``: the pretrained weights and the image size). Such
    mistakes raise ``RunError`` saying what to change. Once the data is loaded, rank 0 writes
    the resolved settings to ``output_dir/config.yaml`` (``config_format`` "toml":
    ``config.toml``; ``config_files.write_run_config``) before training starts."""
    validate_config(config)
    if config.log != "none" and not config.output_dir:
        raise RunError(f"--log {config.log} writes its files under the run's folder: pass --output-dir")
    if config.data_root is not None:
        config = dataclasses.replace(config, data_root=str(Path(config.data_root).expanduser().resolve()))
    rank, world_size, local_rank = init_distributed()
    device = resolve_device(config, local_rank)
    check_device(config, device)
    prepare_output_dir(config)
    check_model(config)
    seed_everything(config.seed)
    data = load_data(config)
    if config.overwrite and rank == 0:  # the data is there: the replaced run goes now, none of its folds resumed later
        discard_run_checkpoints(config.output_dir)
    if config.output_dir and rank == 0:
        try:
            write_run_config(config, config.output_dir, config_format)
        except OSError as exc:
            raise RunError(f"cannot write the run's settings into {config.output_dir} ({type(exc).__name__}: {exc}): is the disk "
                           f"full? free space there, or pass another --output-dir") from exc
    protocol = train_mlrc if config.protocol == "mlrc" else train_standard
    return {**protocol(config, data, device, rank=rank, world_size=world_size), "device": str(device)}
