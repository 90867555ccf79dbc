"""Evaluation of saved models without training (``gsp-kernels evaluate``).

``evaluate_checkpoints(paths)`` rebuilds each model from the settings stored in its
checkpoint, loads its weights (the early-stopping best when the run kept one) and reports
the test split's retrieval metrics; several models (e.g. the four of an mlrc run) are also
evaluated as the normalized concatenation of their embeddings. ``gsp-kernels evaluate``
prints the result with ``report.evaluation_table``. The models are built and their weights
loaded before any data is read; a checkpoint that is not one, or does not fit, is a
``RunError`` saying so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, model_state, run_checkpoints
from .config import RunError, TrainConfig, validate_config
from .distributed import check_device, resolve_device
from .embeddings import concatenated_metrics, embed_test_splits, retrieval_scores
from .metrics import separated_metrics
from .models import build_model_for, check_image_fits, prototypes_warm_up
from .run import load_data


def checkpoint_files(paths) -> list[Path]:
    """Checkpoint files from ``paths``: files as given; a folder stands for its
    checkpoint.pt, or else its fold<k>/checkpoint.pt in fold order (an mlrc run; other
    folders, such as a stray fold_old/, are not the run's)."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir() and (found := run_checkpoints(path)):
            files.extend(found[:1] if found[0] == path / CHECKPOINT_NAME else found)
        else:
            raise FileNotFoundError(f"no checkpoint at {str(path)!r} (a file, or a folder with {CHECKPOINT_NAME} or fold<k>/{CHECKPOINT_NAME})")
    return files


def config_from_checkpoint(checkpoint: dict, path: str | Path = "the checkpoint", **overrides) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (fields it lacks take their defaults),
    with ``overrides`` (where to find the data, which device) on top. ``pretrained`` is
    dropped: the checkpoint holds every weight, and the file it named need not be here. A
    saved data root that is no folder here (moved, or relative to another directory) is a
    RunError asking for ``--data-root``."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    saved = {name: value for name, value in checkpoint["config"].items() if name in known}
    config = TrainConfig(**{**saved, **overrides, "resume": False, "overwrite": False, "output_dir": None, "pretrained": None})
    if "data_root" not in overrides and config.dataset != "collage" and not Path(config.data_root or "").expanduser().is_dir():
        raise RunError(f"{path} was trained on {config.dataset} at data root {config.data_root!r}, which is not a folder here "
                       f"(moved, or relative to the directory it was trained from): pass --data-root")
    validate_config(config)
    return config


def evaluate_checkpoints(paths, **overrides) -> dict:
    """Test metrics of the models in ``paths`` (see ``checkpoint_files``). ``overrides``:
    TrainConfig fields such as dataset, data_root, device, num_workers, eval_batch_size.

    -> {"checkpoints", "dataset", "splits", "split_differences", "models": [{"checkpoint",
    "epochs_trained", "embedding_dim", "metrics"}], "metrics" (the only model's, or the concatenation's),
    "concatenated_dim" and "separated_metrics" (the mean over the models; several models)}."""
    files = checkpoint_files(paths)
    configs, built, epochs_trained = [], [], []
    for path in files:  # each file read once; only its model is kept past this loop
        checkpoint = load_checkpoint(path)
        config = config_from_checkpoint(checkpoint, path, **overrides)
        configs.append(config)
        built.append(_model_from(checkpoint, config, path))
        epochs_trained.append(checkpoint["epoch"] + 1)
    first = configs[0]
    data_keys = ("dataset", "data_root", "image_size", "resize", "num_train_classes", "collages_per_digit", "data_seed")
    for path, config in zip(files[1:], configs[1:]):
        differing = [key for key in data_keys if getattr(config, key) != getattr(first, key)]
        if differing:
            raise RunError(f"{path} was trained with other data settings than {files[0]}: {differing} (evaluate them apart)")
    device = resolve_device(first)
    for config in configs:
        check_device(config, device)
    data = load_data(first)
    models, query_parts, gallery_parts = [], [], []
    for path, config, model, epochs in zip(files, configs, built, epochs_trained):
        model = model.to(device)
        query, gallery = embed_test_splits(model, data, config, device)
        query_parts.append(query)
        gallery_parts.append(gallery)
        models.append({"checkpoint": str(path), "epochs_trained": epochs, "embedding_dim": query.shape[1],
                       "metrics": retrieval_scores(data, query, gallery), "warm_up": prototypes_warm_up(model)})
    warnings = [f"{model['checkpoint']}: the GSP prototypes never left their warm-up (the prototype memory held "
                f"{model['warm_up']['memory_filled']} of {model['warm_up']['memory_size']} pooled embeddings), so the model pools by "
                f"GAP: GAP numbers, not GSP's" for model in models if model["warm_up"] is not None]
    result = {"checkpoints": [str(path) for path in files], "dataset": first.dataset, "splits": data.describe(),
              "split_differences": data.differences_from_papers(), "models": models, "warnings": warnings}
    if len(models) == 1:
        result["metrics"] = models[0]["metrics"]
        return result
    result["metrics"], result["concatenated_dim"] = concatenated_metrics(data, query_parts, gallery_parts)
    result["separated_metrics"] = separated_metrics([model["metrics"] for model in models])
    return result


def _model_from(checkpoint: dict, config: TrainConfig, path: Path):
    """The model ``config`` describes with the checkpoint's weights (on the CPU), checked to take
    the run's images; a RunError when the weights do not fit it."""
    model = build_model_for(config, load_pretrained=False)  # the checkpoint has every weight
    try:
        model.load_state_dict(model_state(checkpoint))
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path}: its weights do not fit the model its settings describe ({first})") from exc
    check_image_fits(model, config)
    return model
