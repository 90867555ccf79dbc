"""Evaluation of saved models without training (``gsp-kernels evaluate``).

``evaluate_checkpoints(paths)`` rebuilds each model from the settings stored in its
checkpoint, loads its weights (``loading``: the best validation epoch's when the run kept one,
or the last epoch's) and reports
the test split's retrieval metrics; several models (e.g. the four of an mlrc run) are also
evaluated as the normalized concatenation of their embeddings. ``gsp-kernels evaluate``
prints the result with ``report.evaluation_table``. The models are built and their weights
loaded before any data is read; a checkpoint that is not one, or does not fit, is a
``RunError`` saying so.
"""

from __future__ import annotations

from .checkpoint import load_trained_weights
from .config import RunError
from .distributed import check_device, resolve_device
from .embeddings import concatenated_metrics, embed_test_splits, retrieval_scores
from .loading import config_from_saved, model_from_weights, run_parts
from .metrics import separated_metrics
from .models import prototypes_warm_up
from .run import load_data


def evaluate_checkpoints(paths, which: str = "best", **overrides) -> dict:
    """Test metrics of the models in ``paths`` (files or run folders, ``loading.run_parts``);
    ``which``: "best" (a run's best validation epoch when it kept one, else its last) or "last".
    ``overrides``: TrainConfig fields such as dataset, data_root, device, num_workers,
    eval_batch_size.

    -> {"checkpoints", "dataset", "device", "splits", "split_differences", "models": [{"checkpoint" (the
    file read), "which", "epoch" (1-based, of the weights), "embedding_dim", "metrics",
    "warm_up"}], "metrics" (the only model's, or the concatenation's), "concatenated_dim" and
    "separated_metrics" (the mean over the models; several models)}."""
    files, configs, built = [], [], []
    for part in run_parts(paths):  # each file read once; only its model is kept past this loop
        weights = load_trained_weights(part, which)
        config = config_from_saved(weights["config"], weights["path"], **overrides)
        files.append(weights["path"])
        configs.append(config)
        built.append(model_from_weights(weights, config))
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
    for path, config, model in zip(files, configs, built):
        model = model.to(device)
        query, gallery = embed_test_splits(model, data, config, device)
        query_parts.append(query)
        gallery_parts.append(gallery)
        models.append({"checkpoint": str(path), "which": model.which, "epoch": model.epoch + 1, "embedding_dim": query.shape[1],
                       "metrics": retrieval_scores(data, query, gallery), "warm_up": prototypes_warm_up(model)})
    warnings = [f"{model['checkpoint']}: the GSP prototypes never left their warm-up (the prototype memory held "
                f"{model['warm_up']['memory_filled']} of {model['warm_up']['memory_size']} pooled embeddings), so the model pools by "
                f"GAP: GAP numbers, not GSP's" for model in models if model["warm_up"] is not None]
    result = {"checkpoints": [str(path) for path in files], "dataset": first.dataset, "device": str(device), "splits": data.describe(),
              "split_differences": data.differences_from_papers(), "models": models, "warnings": warnings}
    if len(models) == 1:
        result["metrics"] = models[0]["metrics"]
        return result
    result["metrics"], result["concatenated_dim"] = concatenated_metrics(data, query_parts, gallery_parts)
    result["separated_metrics"] = separated_metrics([model["metrics"] for model in models])
    return result
