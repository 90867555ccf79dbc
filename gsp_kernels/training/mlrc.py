"""The protocol of "A Metric Learning Reality Check" (Musgrave et al., 2020), as the GSP
authors' TensorFlow framework runs it (``dml_*.yaml``).

The training classes are cut into ``num_folds`` class-disjoint folds. Model k trains on the
other folds and validates on fold k (test-time transform) after every epoch: its weights at
the best validation MAP@R are kept, and training stops after ``early_stopping_patience``
epochs without a better one. Model selection never sees the test classes. Each model is
evaluated on the test split, and so is the concatenation of the models' embeddings (each
L2-normalized, then the concatenation normalized again: 4 x 128-d -> 512-d).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..table import format_table
from .benchmarks import BenchmarkData, class_folds, subset
from .config import TrainConfig, eval_resize
from .data import test_transform
from .metrics import format_metrics_table, retrieval_metrics
from .report import run_title, split_note, splits_line
from .train import (
    CHECKPOINT_NAME,
    compute_embeddings,
    embed_test_splits,
    embedding_options,
    fit,
    metrics_entries,
    retrieval_scores,
    seed_everything,
)


def concatenate_embeddings(parts: list[Tensor]) -> Tensor:
    """``[n, E_1] ... [n, E_k]`` -> ``[n, E_1 + ... + E_k]``: each part L2-normalized, then
    the concatenation normalized."""
    return F.normalize(torch.cat([F.normalize(part, dim=1) for part in parts], dim=1), dim=1)


def separated_metrics(per_model: list[dict]) -> dict:
    """The mean of each metric over the models evaluated one by one (MLRC's "separated")."""
    return {name: sum(metrics[name] for metrics in per_model) / len(per_model) for name in per_model[0]}


def concatenated_metrics(data: BenchmarkData, query_parts: list[Tensor], gallery_parts: list[Tensor | None]) -> tuple[dict, int]:
    """(test metrics, dimension) of the models' concatenated embeddings (``concatenate_embeddings``)."""
    query = concatenate_embeddings(query_parts)
    gallery = None if data.gallery is None else concatenate_embeddings(gallery_parts)
    return retrieval_scores(data, query, gallery), query.shape[1]


def validation_map_at_r(model: nn.Module, val_set, config: TrainConfig, device: torch.device) -> float:
    """MAP@R of ``val_set`` searched all against all with ``model``'s embeddings."""
    embeddings = compute_embeddings(model, val_set, device, **embedding_options(config))
    return retrieval_metrics(embeddings, val_set.labels, recall_ks=(1,))["map@r"]


def _validation_transform(config: TrainConfig):
    """The test-time transform for a validation fold of an image dataset (None for the
    collage data, whose tensors have no transform)."""
    return None if config.dataset == "collage" else test_transform(eval_resize(config), config.image_size)


def train_mlrc(config: TrainConfig, data: BenchmarkData, device: torch.device, *, rank: int = 0, world_size: int = 1) -> dict:
    """Train one model per class-disjoint fold of ``data.train`` and evaluate each and their
    concatenation on the test split. Fold k trains with seed ``config.seed + k - 1`` and
    checkpoints to ``output_dir/fold<k>/checkpoint.pt`` (resumable fold by fold).

    -> the ``train`` result with "folds" (per model: its classes, best epoch, validation
    MAP@R, history, test metrics), "metrics" of the concatenated embeddings and
    "separated_metrics" (the mean over the models); "models" holds the models (rank 0 gets
    the metrics, other ranks None)."""
    folds = class_folds(data.train.labels, config.num_folds, seed=config.seed)
    val_transform = _validation_transform(config)
    records, models, query_parts, gallery_parts = [], [], [], []
    for index, (train_indices, val_indices) in enumerate(folds, start=1):
        fold_config = dataclasses.replace(config, seed=config.seed + index - 1)
        seed_everything(fold_config.seed)
        train_set = subset(data.train, train_indices)
        val_set = subset(data.train, val_indices, transform=val_transform)
        checkpoint = Path(config.output_dir) / f"fold{index}" / CHECKPOINT_NAME if config.output_dir else None
        run = fit(fold_config, train_set, device, rank=rank, world_size=world_size, checkpoint_path=checkpoint,
                  validate=lambda model, val_set=val_set, fold_config=fold_config: validation_map_at_r(model, val_set, fold_config, device),
                  description=f"fold {index}/{len(folds)} ")
        models.append(run["model"])
        record = {
            "fold": index,
            "seed": fold_config.seed,
            "train": {"classes": train_set.num_classes, "images": len(train_set)},
            "validation": {"classes": val_set.num_classes, "images": len(val_set)},
            "validation_class_ids": torch.unique(data.train.labels[val_indices]).tolist(),  # labels of data.train
            "best_epoch": run["best_epoch"],
            "best_val_map_at_r": run["best_score"],
            "epochs": run["history"],
            "seconds": run["seconds"],
            "images_per_second": run["images_per_second"],
            "metrics": None,
        }
        if rank == 0:
            query, gallery = embed_test_splits(run["model"], data, config, device)
            record["metrics"] = retrieval_scores(data, query, gallery)
            query_parts.append(query)
            gallery_parts.append(gallery)
        records.append(record)
    seconds = sum(record["seconds"] for record in records)
    images = sum(record["seconds"] * (record["images_per_second"] or 0) for record in records)
    result = {"config": config, "splits": data.describe(), "split_differences": data.differences_from_papers(),
              "folds": records, "seconds": seconds, "images_per_second": images / seconds if seconds > 0 else None, "model": None, "models": models,
              "metrics": None, "recall_at_1": None, "map_at_r": None}
    if rank == 0:
        metrics, result["concatenated_dim"] = concatenated_metrics(data, query_parts, gallery_parts)
        result.update(metrics_entries(metrics))
        result["separated_metrics"] = separated_metrics([record["metrics"] for record in records])
    return result


def mlrc_table(result: dict) -> str:
    """Per fold: classes, best epoch and validation MAP@R; then the test metrics of every
    model and of the concatenation."""
    rows = [[str(record["fold"]), str(record["train"]["classes"]), str(record["validation"]["classes"]),
             str(record["best_epoch"]), f"{record['best_val_map_at_r']:.4f}", f"{record['images_per_second'] or 0:.1f}"]
            for record in result["folds"]]
    header = ["fold", "train classes", "val classes", "best epoch", "val MAP@R", "images/s"]
    table = f"{run_title(result['config'])}\n{format_table(header, rows)}"
    if result["metrics"] is not None:
        dim = result["config"].embedding_dim
        per_model = {f"fold {record['fold']} ({dim}-d)": record["metrics"] for record in result["folds"]}
        per_model[f"separated (mean of {len(result['folds'])}, {dim}-d)"] = result["separated_metrics"]
        per_model[f"concatenated ({result['concatenated_dim']}-d)"] = result["metrics"]
        table += f"\n{splits_line(result['splits'])}{split_note(result.get('split_differences'))}"
        table += f"\n{format_metrics_table(per_model)}"
        table += f"\n({result['seconds']:.1f} s training, {result['images_per_second'] or 0:.1f} images/s)"
    return table
