"""Evaluation of saved models without training (``gsp-kernels evaluate``).

``evaluate_checkpoints(paths)`` rebuilds each model from the settings stored in its
checkpoint, loads its weights (the early-stopping best when the run kept one) and reports
the test split's retrieval metrics; several models (e.g. the four of an mlrc run) are also
evaluated as the normalized concatenation of their embeddings. ``gsp-kernels evaluate``
prints the result with ``report.evaluation_table``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, model_state
from .config import TrainConfig, validate_config
from .distributed import resolve_device
from .embeddings import concatenated_metrics, embed_test_splits, retrieval_scores
from .metrics import separated_metrics
from .models import build_model_for
from .run import load_data


def checkpoint_files(paths) -> list[Path]:
    """Checkpoint files from ``paths``: files as given; a folder stands for its
    checkpoint.pt, or else its fold*/checkpoint.pt in fold order (an mlrc run)."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif (path / CHECKPOINT_NAME).is_file():
            files.append(path / CHECKPOINT_NAME)
        elif path.is_dir() and (folds := sorted(path.glob(f"fold*/{CHECKPOINT_NAME}"), key=lambda p: int(p.parent.name[4:]))):
            files.extend(folds)
        else:
            raise FileNotFoundError(f"no checkpoint at {str(path)!r} (a file, or a folder with {CHECKPOINT_NAME} or fold*/{CHECKPOINT_NAME})")
    return files


def config_from_checkpoint(checkpoint: dict, **overrides) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (fields it lacks take their defaults),
    with ``overrides`` (where to find the data, which device) on top. ``pretrained`` is
    dropped: the checkpoint holds every weight, and the file it named need not be here."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    saved = {name: value for name, value in checkpoint["config"].items() if name in known}
    config = TrainConfig(**{**saved, **overrides, "resume": False, "output_dir": None, "pretrained": None})
    validate_config(config)
    return config


def evaluate_checkpoints(paths, **overrides) -> dict:
    """Test metrics of the models in ``paths`` (see ``checkpoint_files``). ``overrides``:
    TrainConfig fields such as dataset, data_root, device, num_workers, eval_batch_size.

    -> {"checkpoints", "dataset", "splits", "split_differences", "models": [{"checkpoint",
    "epochs_trained", "embedding_dim", "metrics"}], "metrics" (the only model's, or the concatenation's),
    "concatenated_dim" and "separated_metrics" (the mean over the models; several models)}."""
    files = checkpoint_files(paths)
    configs, weights, epochs_trained = [], [], []
    for path in files:  # each file read once; only its model weights are kept past this loop
        checkpoint = load_checkpoint(path)
        configs.append(config_from_checkpoint(checkpoint, **overrides))
        weights.append(model_state(checkpoint))
        epochs_trained.append(checkpoint["epoch"] + 1)
    first = configs[0]
    data_keys = ("dataset", "data_root", "image_size", "resize", "num_train_classes", "collages_per_digit", "data_seed")
    for path, config in zip(files[1:], configs[1:]):
        differing = [key for key in data_keys if getattr(config, key) != getattr(first, key)]
        if differing:
            raise ValueError(f"{path} was trained with other data settings than {files[0]}: {differing}")
    device = resolve_device(first)
    data = load_data(first)
    models, query_parts, gallery_parts = [], [], []
    for path, config, state, epochs in zip(files, configs, weights, epochs_trained):
        model = build_model_for(config, load_pretrained=False).to(device)  # the checkpoint has every weight
        model.load_state_dict(state)
        query, gallery = embed_test_splits(model, data, config, device)
        query_parts.append(query)
        gallery_parts.append(gallery)
        models.append({"checkpoint": str(path), "epochs_trained": epochs, "embedding_dim": query.shape[1],
                       "metrics": retrieval_scores(data, query, gallery)})
    result = {"checkpoints": [str(path) for path in files], "dataset": first.dataset, "splits": data.describe(),
              "split_differences": data.differences_from_papers(), "models": models}
    if len(models) == 1:
        result["metrics"] = models[0]["metrics"]
        return result
    result["metrics"], result["concatenated_dim"] = concatenated_metrics(data, query_parts, gallery_parts)
    result["separated_metrics"] = separated_metrics([model["metrics"] for model in models])
    return result
